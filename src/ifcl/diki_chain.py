"""The per-task steps of a DIKI run (one Snakemake rule each; reference/diki.md).

A DIKI experiment learns a sequence of datasets, one task each, on a frozen CLIP. Per run
``results/runs/<experiment>/seed<k>/``:

    task<t>/gaussian.safetensors  mean and covariance of the frozen features of dataset t's training images (§3.1)
    task<t>/prefix.safetensors    the trained key/value prefixes of task t (§2), from the best validation epoch
    task<t>/train_log.csv         loss, accuracy, validation accuracy and lr per epoch
    task<t>/eval.json             accuracy on every dataset of the sequence after task t (seen and unseen, §5.2)

Both the Gaussian and the prefixes of task t depend only on the frozen backbone and dataset t, so the tasks can
train in parallel (``rng: per-task``); ``rng: sequential`` chains one random stream through the tasks in order, as
the official single process does. The frozen, L2-normalised image features of every dataset are computed once per
backbone (``results/features/<backbone>/<dataset>/{train,test}.safetensors``) and reused by the Gaussians and by
every evaluation row.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .chain import pick_device, seed_everything
from .config import derive_seed
from .data.loader import image_batches
from .data.manifest import class_names_of, read_manifest
from .files import file_sha256, write_csv, write_json
from .methods.diki import TaskGaussian, calibrate, fit_gaussian, iteration_lrs
from .models.clip_prefix import CLIPPrefix, load_clip, prompts, tokenize
from .state import load_state, save_state
from .training import autocast


def _batches(manifest: str, backbone_spec: dict, batch_size: int, device, shuffle: bool = False, seed: int = 0,
             decoded: str | None = None):
    """Every image of a manifest with its dataset-local label, under CLIP's preprocessing (no augmentation, §1),
    in batches on ``device``; ``decoded``: read from that decoded-image cache."""
    labels = sorted({label for _, label, _ in read_manifest(manifest)})
    return image_batches(manifest, labels, labels, "clip", backbone_spec, batch_size, shuffle, seed, device,
                         decoded=decoded)


def _prompt_tokens(manifest: str, dataset_spec: dict, clip) -> torch.Tensor:
    return tokenize(prompts(class_names_of(read_manifest(manifest)), dataset_spec.get("template")), clip.context_length)


def _prefix_model(backbone_spec: dict, weights: str, prefix_cfg: dict) -> CLIPPrefix:
    return CLIPPrefix(load_clip(backbone_spec, weights), prefix_cfg["depth_vision"], prefix_cfg["depth_text"],
                      prefix_cfg["length"])


@torch.no_grad()
def frozen_features(backbone_spec: dict, weights: str, dataset_spec: dict, manifest: str, out: str,
                    batch_size: int = 256, threads: int = 1) -> None:
    """Frozen, L2-normalised image features of every image of ``manifest`` (manifest order), with the frozen
    model's zero-shot accuracy on them (the dataset's template, its own classes)."""
    torch.set_num_threads(threads)
    device = pick_device()
    clip = load_clip(backbone_spec, weights).to(device)
    loader = _batches(manifest, backbone_spec, batch_size, device)
    feats, labels = [], []
    for x, y in tqdm(loader, desc="frozen features", leave=False, mininterval=5):
        feats.append(F.normalize(clip.encode_image(x), dim=-1).float().cpu())
        labels.append(y)
    feats, labels = torch.cat(feats), torch.cat(labels)
    text = F.normalize(clip.encode_text(_prompt_tokens(manifest, dataset_spec, clip).to(device)), dim=-1).float().cpu()
    zero_shot = 100.0 * float(((feats @ text.T).argmax(1) == labels).float().mean())
    print(f"{len(labels)} images, zero-shot accuracy {zero_shot:.2f}%")
    save_state(out, {"features": feats, "labels": labels},
               {"kind": "frozen_features", "zero_shot_accuracy": zero_shot, "backbone_sha256": file_sha256(weights)})


def gaussian(features_file: str, out: str) -> None:
    """Task t's Gaussian from the frozen training features of its dataset (§3.1)."""
    tensors, meta = load_state(features_file)
    g = fit_gaussian(tensors["features"])
    save_state(out, {"mean": g.mean, "covariance": g.covariance},
               {"kind": "gaussian", "images": int(tensors["features"].shape[0]), "backbone_sha256": meta["backbone_sha256"]})


def load_gaussian(path: str) -> TaskGaussian:
    tensors, _ = load_state(path)
    return TaskGaussian(tensors["mean"], tensors["covariance"])


def _accuracy(model: CLIPPrefix, prefix: dict, tokens: torch.Tensor, loader, device, precision: str) -> float:
    """Oracle-path accuracy (the task's own prefixes at full strength), as the official validation (§4)."""
    correct = total = 0
    with torch.no_grad(), autocast(device, precision):
        text = model.encode_text(tokens, prefix)
        for x, y in loader:
            pred = (model.encode_image(x, prefix) @ text.T).argmax(1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    return 100.0 * correct / total


def train_prefix(experiment_name: str, experiment: dict, seed: int, task: int, dataset_spec: dict, backbone_spec: dict,
                 weights: str, train_csv: str, val_csv: str | None, out: str, log_out: str,
                 previous_prefix: str | None = None, threads: int = 1, decoded_train: str | None = None,
                 decoded_val: str | None = None) -> None:
    """Train task t's prefixes on dataset t: SGD, per-iteration cosine, cross-entropy over the dataset's classes with
    its template; keep the epoch with the best validation accuracy (§4)."""
    torch.set_num_threads(threads)
    cfg = experiment["train"]
    device = pick_device()
    model = _prefix_model(backbone_spec, weights, experiment["prefix"]).to(device)
    gen = torch.Generator()
    if experiment["rng"] == "sequential" and task > 0:
        gen.set_state(load_state(previous_prefix)[0]["rng_state"])
    else:
        gen.manual_seed(derive_seed(experiment_name, seed, "prefix") if experiment["rng"] == "sequential"
                        else derive_seed(experiment_name, seed, task, "prefix"))
    seed_everything(int(torch.randint(2**62, (1,), generator=gen)))
    prefix = {k: v.to(device).requires_grad_(True) for k, v in model.new_prefix(gen).items()}
    tokens = _prompt_tokens(train_csv, dataset_spec, model.clip).to(device)
    loader = _batches(train_csv, backbone_spec, cfg["batch_size"], device, shuffle=True,
                      seed=int(torch.randint(2**62, (1,), generator=gen)), decoded=decoded_train)
    val = None
    if val_csv is not None and read_manifest(val_csv):
        val = _batches(val_csv, backbone_spec, experiment["eval_batch_size"], device, decoded=decoded_val)
    optimizer = torch.optim.SGD(list(prefix.values()), lr=cfg["lr"], momentum=0.0, weight_decay=cfg["weight_decay"])
    lrs = iteration_lrs(cfg["lr"], cfg["epochs"] * len(loader), cfg["final_lr_ratio"])
    scale = model.logit_scale().detach()
    print(f"task {task}: {len(loader.dataset)} images, {model.trainable_parameters()} trainable parameters, "
          f"validation on {len(val.dataset) if val else 0} images")
    rows, best, best_acc, step = [], None, -1.0, 0
    for epoch in range(cfg["epochs"]):
        loss_sum = correct = seen = 0
        for x, y in tqdm(loader, desc=f"task {task} epoch {epoch}", leave=False, mininterval=5):
            for group in optimizer.param_groups:
                group["lr"] = lrs[step]
            y = y.to(device)
            with autocast(device, experiment["gpu_precision"]):
                logits = scale * model.encode_image(x, prefix) @ model.encode_text(tokens, prefix).T
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            step += 1
        val_acc = _accuracy(model, prefix, tokens, val, device, experiment["gpu_precision"]) if val else float("nan")
        rows.append({"epoch": epoch, "loss": loss_sum / seen, "train_accuracy": 100.0 * correct / seen,
                     "val_accuracy": val_acc, "lr_last": lrs[step - 1]})
        print(f"epoch {epoch}: loss {loss_sum / seen:.4f}, train {100.0 * correct / seen:.2f}%, val {val_acc:.2f}%")
        if val is None or val_acc > best_acc:  # strictly better (§4); without validation the last epoch
            best_acc, best = val_acc, {"epoch": epoch, "prefix": {k: v.detach().cpu().clone() for k, v in prefix.items()}}
    write_csv(log_out, rows)
    tensors = dict(best["prefix"])
    if experiment["rng"] == "sequential":
        tensors["rng_state"] = gen.get_state()
    save_state(out, tensors, {"kind": "prefix", "task": task, "best_epoch": best["epoch"], "val_accuracy": best_acc,
                              "trainable_parameters": model.trainable_parameters(), "train": cfg,
                              "backbone_sha256": file_sha256(weights)})


def calibrated_logits(model: CLIPPrefix, prefixes: list[dict], gaussians: list[TaskGaussian], images: torch.Tensor,
                      tokens: torch.Tensor, frozen: torch.Tensor, calibration: dict):
    """DIKI's calibrated inference on one batch (§3.2): the task of each image from its frozen features under the
    learnt Gaussians (batch-wise majority vote or per sample), λ per image; the image tower with that task's
    prefixes scaled by λ, the text tower with the batch's (or, per sample, each selected task's) mean λ.
    Returns (logits [B, classes], task ids [B], λ [B])."""
    ids, lam = calibrate(frozen, gaussians, batchwise=calibration["batchwise"], scale=calibration["scale"])
    lam_d = lam.to(images.device)
    if calibration["batchwise"]:
        u = int(ids[0])
        image = model.encode_image(images, prefixes[u], lam_d)
        return image @ model.encode_text(tokens, prefixes[u], float(lam.mean())).T, ids, lam
    # per sample: each image its own task; the text once per selected task with that task's mean λ
    image = model.encode_image(images, per_sample=[prefixes[int(i)] for i in ids], weight=lam_d)
    logits = torch.empty(len(images), tokens.shape[0], device=images.device)
    for u in ids.unique().tolist():
        rows = (ids == u).to(images.device)
        logits[rows] = image[rows] @ model.encode_text(tokens, prefixes[u], float(lam[ids == u].mean())).T
    return logits, ids, lam


class DIKIModel(torch.nn.Module):
    """"The model after task t" of a DIKI run: the frozen CLIP with the prefixes and Gaussians of tasks 0..t,
    classifying by calibrated inference. ``forward(images, tokens)`` -> logits over the tokenised class prompts
    (``tokenize(prompts(class_names, template))``); the frozen image features are computed on the way."""

    def __init__(self, model: CLIPPrefix, prefixes: list[dict], gaussians: list[TaskGaussian], calibration: dict):
        super().__init__()
        self.model, self.gaussians, self.calibration = model, gaussians, calibration
        self._prefix_names = [list(p) for p in prefixes]
        for t, p in enumerate(prefixes):  # buffers, so that .to(device) moves them with the model
            for name, value in p.items():
                self.register_buffer(self._buffer(t, name), value)

    @staticmethod
    def _buffer(t: int, name: str) -> str:
        return f"prefix{t}_" + name.replace(".", "_")

    def task_prefixes(self) -> list[dict]:
        return [{n: getattr(self, self._buffer(t, n)) for n in names} for t, names in enumerate(self._prefix_names)]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        frozen = self.model.encode_image(images).cpu()
        return calibrated_logits(self.model, self.task_prefixes(), self.gaussians, images, tokens, frozen,
                                 self.calibration)[0]


def model_after_task(experiment: dict, backbone_spec: dict, weights: str, run_dir: str | Path, t: int) -> DIKIModel:
    """The DIKI model after task ``t`` of a run, from its per-task files (eval mode, CPU)."""
    model = _prefix_model(backbone_spec, weights, experiment["prefix"])
    files = [Path(run_dir) / f"task{s}" for s in range(t + 1)]
    prefixes = [{k: v for k, v in load_state(f / "prefix.safetensors")[0].items() if k != "rng_state"} for f in files]
    gaussians = [load_gaussian(str(f / "gaussian.safetensors")) for f in files]
    return DIKIModel(model, prefixes, gaussians, experiment["calibration"]).eval()


WEIGHT_BINS = 20  # eval.json's histogram of the per-image λ: equal bins on [0, 1]


@torch.no_grad()
def evaluate(experiment: dict, task: int, dataset_specs: list[dict], backbone_spec: dict, weights: str,
             gaussian_files: list[str], prefix_files: list[str], test_csvs: list[str], feature_files: list[str],
             out: str, threads: int = 1, decoded: list[str] | None = None) -> None:
    """Row ``task`` of the accuracy matrix: every dataset of the sequence (seen and unseen) through the calibrated
    path (§3.2, §5.2): batches of ``eval_batch_size`` consecutive test images, the task from the learnt Gaussians
    (batch-wise majority vote, or per sample), λ per image, the batch's (or the task's) mean λ for the text.
    eval.json also holds, per dataset, the mean λ and the counts of λ in ``WEIGHT_BINS`` equal bins on [0, 1]."""
    torch.set_num_threads(threads)
    device = pick_device()
    model = _prefix_model(backbone_spec, weights, experiment["prefix"]).to(device)
    gaussians = [load_gaussian(f) for f in gaussian_files]
    prefixes = [{k: v.to(device) for k, v in load_state(f)[0].items() if k != "rng_state"} for f in prefix_files]
    cal = experiment["calibration"]
    start = time.perf_counter()
    accs, weights_mean, chosen, histograms = [], [], [], []
    for spec, test_csv, feature_file, cache in zip(dataset_specs, test_csvs, feature_files,
                                                   decoded or [None] * len(test_csvs)):
        frozen = load_state(feature_file)[0]["features"]
        tokens = _prompt_tokens(test_csv, spec, model.clip).to(device)
        loader = _batches(test_csv, backbone_spec, experiment["eval_batch_size"], device, decoded=cache)
        correct = total = 0
        lam_sum, counts = 0.0, torch.zeros(len(gaussians), dtype=torch.long)
        histogram = torch.zeros(WEIGHT_BINS, dtype=torch.long)
        for x, y in loader:
            with autocast(device, experiment["gpu_precision"]):
                logits, ids, lam = calibrated_logits(model, prefixes, gaussians, x, tokens,
                                                     frozen[total: total + len(y)], cal)
            correct += int((logits.argmax(1).cpu() == y).sum())
            total += len(y)
            lam_sum += float(lam.sum())
            counts += torch.bincount(ids, minlength=len(gaussians))
            bins = (lam.double() * WEIGHT_BINS).floor().long().clamp(0, WEIGHT_BINS - 1)  # λ = 1: the last bin
            histogram += torch.bincount(bins, minlength=WEIGHT_BINS)
        if total != frozen.shape[0]:
            raise RuntimeError(f"{test_csv}: {total} images but {frozen.shape[0]} cached features")
        accs.append(100.0 * correct / total)
        weights_mean.append(lam_sum / total)
        chosen.append(counts.tolist())
        histograms.append(histogram.tolist())
    print(f"after task {task}: accuracy per dataset {[round(a, 2) for a in accs]}; "
          f"mean λ per dataset {[round(w, 3) for w in weights_mean]} ({time.perf_counter() - start:.1f} s)")
    edges = [b / WEIGHT_BINS for b in range(WEIGHT_BINS + 1)]
    write_json(out, {"task": task, "accuracy": accs, "mean_weight": weights_mean, "selected_task_counts": chosen,
                     "weight_histogram": histograms, "weight_bin_edges": edges})
