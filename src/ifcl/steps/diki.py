"""The steps of a DIKI run, one Snakemake rule each (``lloongx/DIKI``; file layout: :mod:`ifcl.layout`).

A DIKI experiment learns a sequence of datasets, one task each, on a frozen CLIP. The frozen, L2-normalised image
features of every dataset are computed once per backbone (:func:`frozen_features`) and reused by the Gaussians
(:func:`gaussian`) and by every evaluation row (:func:`evaluate`). Both the Gaussian and the prefixes
(:func:`train`) of task t depend only on the frozen backbone and dataset t, so the tasks can train in parallel
(``rng: per-task``); ``rng: sequential`` chains one random stream through the tasks in order, as the official
single process does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import layout
from ..checkpoint import loader_generators, resumable
from ..data.loader import image_batches
from ..data.manifest import class_names_of, read_manifest
from ..files import file_sha256, write_csv, write_json
from ..methods.diki import TaskGaussian, calibrate, fit_gaussian, iteration_lrs
from ..models.clip_prefix import CLIPPrefix, load_clip, prompts, tokenize
from ..models.diki import DIKIModel, calibrated_logits
from ..models.weights import backbone_weights_file
from ..progress import epoch_done, track
from ..runtime import autocast, derive_seed, full_precision, seed_everything, start
from ..state import load_state, save_state

FEATURE_BATCH = 256  # the batch size of the frozen-feature pass (it changes nothing but speed)
WEIGHT_BINS = 20  # eval.json's histogram of the per-image λ: equal bins on [0, 1]


def _batches(manifest: str, backbone: dict, batch_size: int, device, shuffle: bool = False, seed: int = 0,
             decoded: str | None = None, workers: int = 0, transform: str = "clip",
             crop_scale: tuple = (0.08, 1.0)):
    """Every image of a manifest with its dataset-local label, under CLIP's preprocessing (no augmentation; or
    ``transform``), in batches on ``device``; ``decoded``: read from that decoded-image cache."""
    labels = sorted({label for _, label, _ in read_manifest(manifest)})
    return image_batches(manifest, labels, labels, transform, backbone, batch_size, shuffle, seed, device,
                         crop_scale=crop_scale, decoded=decoded, workers=workers)


def _prompt_tokens(manifest: str, dataset: dict, clip) -> torch.Tensor:
    return tokenize(prompts(class_names_of(read_manifest(manifest)), dataset.get("template")), clip.context_length)


def prefix_model(model: dict, backbone: dict, weights: str) -> CLIPPrefix:
    """The frozen CLIP with room for prefixes (``model['prefix']``: depth_vision, depth_text, length, attention)."""
    p = model["prefix"]
    return CLIPPrefix(load_clip(backbone, weights), p["depth_vision"], p["depth_text"], p["length"],
                      attention=p["attention"])


def load_gaussian(path: str | Path) -> TaskGaussian:
    tensors, _ = load_state(path)
    return TaskGaussian(tensors["mean"], tensors["covariance"])


def load_prefix(path: str | Path) -> dict:
    return {k: v for k, v in load_state(path)[0].items() if k != "rng_state"}


def model_after_task(experiment: dict, backbone: dict, weights: str | Path, run: str | Path, t: int) -> DIKIModel:
    """The DIKI model after task ``t`` of a run folder, from its per-task files (eval mode, CPU)."""
    prefixes = [load_prefix(layout.in_run(run, s, layout.PREFIX)) for s in range(t + 1)]
    gaussians = [load_gaussian(layout.in_run(run, s, layout.GAUSSIAN)) for s in range(t + 1)]
    return DIKIModel(prefix_model(experiment, backbone, str(weights)), prefixes, gaussians,
                     experiment["calibration"]).eval()


# ---- frozen features and Gaussians ----

@dataclass(frozen=True)
class FrozenFeatures:
    """Rule frozen_features: one dataset split through the frozen CLIP."""

    backbone: dict
    dataset: dict  # the prompt template
    weights: str
    manifest: str
    out: str
    threads: int = 1


@torch.no_grad()
def frozen_features(step: FrozenFeatures) -> None:
    """Frozen, L2-normalised image features of every image of the manifest (manifest order, float32 forward), with
    the frozen model's zero-shot accuracy on them (the dataset's template, its own classes)."""
    device = start(step.threads)
    clip = load_clip(step.backbone, step.weights).to(device)
    loader = _batches(step.manifest, step.backbone, FEATURE_BATCH, device)
    feats, labels = [], []
    with full_precision():
        for x, y in track(loader, "frozen features"):
            feats.append(F.normalize(clip.encode_image(x), dim=-1).float().cpu())
            labels.append(y)
        feats, labels = torch.cat(feats), torch.cat(labels)
        text = clip.encode_text(_prompt_tokens(step.manifest, step.dataset, clip).to(device))
        text = F.normalize(text, dim=-1).float().cpu()
    zero_shot = 100.0 * float(((feats @ text.T).argmax(1) == labels).float().mean())
    print(f"{len(labels)} images, zero-shot accuracy {zero_shot:.2f}%")
    save_state(step.out, {"features": feats, "labels": labels},
               {"kind": "frozen_features", "zero_shot_accuracy": zero_shot,
                "backbone_sha256": file_sha256(step.weights)})


@dataclass(frozen=True)
class Gaussian:
    """Rule gaussian: task t's Gaussian from the frozen training features of its dataset."""

    features: str
    out: str


def gaussian(step: Gaussian) -> None:
    """Mean and covariance of the features (float64, stored as float32)."""
    tensors, meta = load_state(step.features)
    g = fit_gaussian(tensors["features"])
    save_state(step.out, {"mean": g.mean, "covariance": g.covariance},
               {"kind": "gaussian", "images": int(tensors["features"].shape[0]),
                "backbone_sha256": meta["backbone_sha256"]})


# ---- training ----

@dataclass(frozen=True)
class Train:
    """Rule train_prefix."""

    exp: str
    seed: int
    t: int
    model: dict  # backbone name, prefix (depth_vision, depth_text, length)
    train: dict  # lr, weight_decay, epochs, batch_size, final_lr_ratio
    rng: str  # per-task | sequential
    eval_batch_size: int  # the validation batches
    dataset: dict  # the prompt template
    backbone: dict
    precision: str
    weights: str
    manifest: str
    prefix: str
    log_csv: str
    val: str | None = None
    previous: str | None = None  # rng sequential, t >= 1: the previous task's prefixes (they hold the stream)
    decoded_train: str | None = None
    decoded_val: str | None = None
    loader_workers: int = 0
    threads: int = 1


def _accuracy(model: CLIPPrefix, prefix: dict, tokens: torch.Tensor, loader, device, precision: str) -> float:
    """Oracle-path accuracy (the task's own prefixes at full strength), as the official validation."""
    correct = total = 0
    with torch.no_grad(), autocast(device, precision):
        text = model.encode_text(tokens, prefix)
        for x, y in loader:
            pred = (model.encode_image(x, prefix) @ text.T).argmax(1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    return 100.0 * correct / total


def train(step: Train) -> None:
    """Train task t's prefixes on dataset t: SGD, per-iteration cosine, cross-entropy over the dataset's classes with
    its template; keep the epoch with the best validation accuracy."""
    cfg = step.train
    device = start(step.threads)
    model = prefix_model(step.model, step.backbone, step.weights).to(device)
    gen = torch.Generator()
    if step.rng == "sequential" and step.t > 0:
        gen.set_state(load_state(step.previous)[0]["rng_state"])
    else:
        gen.manual_seed(derive_seed(step.exp, step.seed, "prefix") if step.rng == "sequential"
                        else derive_seed(step.exp, step.seed, step.t, "prefix"))
    seed_everything(int(torch.randint(2**62, (1,), generator=gen)))
    prefix = {k: v.to(device).requires_grad_(True) for k, v in model.new_prefix(gen).items()}
    tokens = _prompt_tokens(step.manifest, step.dataset, model.clip).to(device)
    loader = _batches(step.manifest, step.backbone, cfg["batch_size"], device, shuffle=True,
                      seed=int(torch.randint(2**62, (1,), generator=gen)), decoded=step.decoded_train,
                      workers=step.loader_workers)
    val = None
    if step.val is not None and read_manifest(step.val):
        val = _batches(step.val, step.backbone, step.eval_batch_size, device, decoded=step.decoded_val,
                       workers=step.loader_workers)
    optimizer = torch.optim.SGD(list(prefix.values()), lr=cfg["lr"], momentum=0.0, weight_decay=cfg["weight_decay"])
    lrs = iteration_lrs(cfg["lr"], cfg["epochs"] * len(loader), cfg["final_lr_ratio"])
    scale = model.logit_scale().detach()
    print(f"task {step.t}: {len(loader.dataset)} images, {model.trainable_parameters()} trainable parameters, "
          f"validation on {len(val.dataset) if val else 0} images")
    with resumable(f"task {step.t}", list(prefix.values()), optimizer, loader_generators(loader) + [gen]) as checkpoint:
        first, saved = checkpoint.resume()
        rows, best, best_acc = saved.get("rows", []), saved.get("best"), saved.get("best_acc", -1.0)
        n_step = first * len(loader)
        for epoch in range(first, cfg["epochs"]):
            loss_sum = correct = seen = 0
            began = time.perf_counter()
            for x, y in track(loader, f"task {step.t} epoch {epoch + 1}/{cfg['epochs']}", epoch=epoch,
                              epochs=cfg["epochs"]):
                for group in optimizer.param_groups:
                    group["lr"] = lrs[n_step]
                y = y.to(device)
                with autocast(device, step.precision):
                    logits = scale * model.encode_image(x, prefix) @ model.encode_text(tokens, prefix).T
                    loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                n_step += 1
            val_acc = _accuracy(model, prefix, tokens, val, device, step.precision) if val else float("nan")
            rows.append({"epoch": epoch, "loss": loss_sum / seen, "train_accuracy": 100.0 * correct / seen,
                         "val_accuracy": val_acc, "lr_last": lrs[n_step - 1]})
            epoch_done(f"task {step.t}", epoch, cfg["epochs"], time.perf_counter() - began, seen, loss=loss_sum / seen,
                       accuracy=100.0 * correct / seen, val_accuracy=val_acc, lr=lrs[n_step - 1])
            if val is None or val_acc > best_acc:  # strictly better; without validation the last epoch
                best_acc, best = val_acc, {"epoch": epoch,
                                           "prefix": {k: v.detach().cpu().clone() for k, v in prefix.items()}}
            checkpoint.epoch_done(epoch, rows=rows, best=best, best_acc=best_acc)
    write_csv(step.log_csv, rows)
    tensors = dict(best["prefix"])
    if step.rng == "sequential":
        tensors["rng_state"] = gen.get_state()
    save_state(step.prefix, tensors, {"kind": "prefix", "task": step.t, "best_epoch": best["epoch"],
                                      "val_accuracy": best_acc, "trainable_parameters": model.trainable_parameters(),
                                      "train": cfg, "backbone_sha256": file_sha256(step.weights)})


# ---- evaluation ----

@dataclass(frozen=True)
class Evaluate:
    """Rule evaluate_diki: every dataset of the sequence after task t (a row of the accuracy matrix)."""

    t: int
    model: dict
    calibration: dict  # batchwise, scale
    eval_batch_size: int
    datasets: list  # the prompt template of every dataset of the sequence
    backbone: dict
    precision: str
    weights: str
    gaussians: list[str]
    prefixes: list[str]
    tests: list[str]
    features: list[str]
    out: str
    decoded: list[str] | None = None
    loader_workers: int = 0
    threads: int = 1


@torch.no_grad()
def evaluate(step: Evaluate) -> None:
    """Row t of the accuracy matrix: every dataset of the sequence (seen and unseen) through the calibrated path:
    batches of ``eval_batch_size`` consecutive test images, the task from the learnt Gaussians on the frozen
    features (float32, from the features files; batch-wise majority vote, or per sample), λ per image, the batch's
    (or the task's) mean λ for the text. eval.json also holds, per dataset, the mean λ and the counts of λ in
    ``WEIGHT_BINS`` equal bins on [0, 1]."""
    device = start(step.threads)
    model = prefix_model(step.model, step.backbone, step.weights).to(device)
    gaussians = [load_gaussian(f) for f in step.gaussians]
    prefixes = [{k: v.to(device) for k, v in load_prefix(f).items()} for f in step.prefixes]
    begin = time.perf_counter()
    accs, weights_mean, chosen, histograms = [], [], [], []
    for spec, test_csv, feature_file, cache in zip(step.datasets, step.tests, step.features,
                                                   step.decoded or [None] * len(step.tests)):
        frozen = load_state(feature_file)[0]["features"]
        tokens = _prompt_tokens(test_csv, spec, model.clip).to(device)
        loader = _batches(test_csv, step.backbone, step.eval_batch_size, device, decoded=cache,
                          workers=step.loader_workers)
        correct = total = 0
        lam_sum, counts = 0.0, torch.zeros(len(gaussians), dtype=torch.long)
        histogram = torch.zeros(WEIGHT_BINS, dtype=torch.long)
        for x, y in loader:
            with autocast(device, step.precision):
                logits, ids, lam = calibrated_logits(model, prefixes, gaussians, x, tokens,
                                                     frozen[total: total + len(y)], step.calibration)
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
    print(f"after task {step.t}: accuracy per dataset {[round(a, 2) for a in accs]}; "
          f"mean λ per dataset {[round(w, 3) for w in weights_mean]} ({time.perf_counter() - begin:.1f} s)")
    edges = [b / WEIGHT_BINS for b in range(WEIGHT_BINS + 1)]
    write_json(step.out, {"task": step.t, "accuracy": accs, "mean_weight": weights_mean, "selected_task_counts": chosen,
                          "weight_histogram": histograms, "weight_bin_edges": edges})


# ---- a run's model on other images (ifcl run predict, ifcl run evaluate: ifcl.predict) ----

@torch.no_grad()
def calibrated_predictions(model, loader, class_names: list[list[str]], tokens: list[torch.Tensor], datasets: list[str],
                     device, precision: str, vocabulary: int | None = None) -> list[dict]:
    """DIKI's calibrated inference (:func:`ifcl.models.diki.calibrated_logits`, as :func:`evaluate` calls it) batch
    by batch. The classes of an image are those of dataset ``vocabulary`` of the sequence, or, when
    it is None, of the dataset of the task chosen for it: each batch is then classified in groups of one chosen task
    (one group, the whole batch, under batch-wise calibration). ``class_names`` and ``tokens``: per dataset."""
    prefixes, gaussians, calibration = model.task_prefixes(), model.gaussians, model.calibration
    logit_scale = float(model.model.logit_scale())
    rows = []
    for x, index in loader:
        frozen = model.frozen_features(x)
        if vocabulary is None:
            with full_precision():
                chosen, _ = calibrate(frozen.float(), gaussians, batchwise=calibration["batchwise"],
                                      scale=calibration["scale"])
        else:
            chosen = torch.full((len(index),), vocabulary, dtype=torch.long)
        for d in chosen.unique().tolist():
            group = chosen == d
            with autocast(device, precision):
                logits, ids, lam = calibrated_logits(model.model, prefixes, gaussians, x[group.to(x.device)],
                                                     tokens[d], frozen[group], calibration)
            logits = logits.float().cpu()
            pred = logits.argmax(1)
            score = (logit_scale * logits).softmax(1).gather(1, pred[:, None])[:, 0]
            for i, c, s, u, w in zip(index[group], pred, score, ids, lam):
                rows.append({"image": int(i), "predicted_class": class_names[d][int(c)], "score": float(s),
                             "task": int(u), "task_dataset": datasets[int(u)], "lambda": float(w)})
    return sorted(rows, key=lambda r: r["image"])


def predictions(config: dict, spec: dict, model: DIKIModel, loader, device, dataset: str | None = None) -> list[dict]:
    """``ifcl run predict``: per image of ``loader`` (batches of CLIP-preprocessed images and their indices) the class
    among those of the dataset of the task chosen for it (or of ``dataset``, one of the sequence), its score, the
    task, its dataset and λ (:func:`calibrated_predictions`)."""
    sequence = spec["sequence"]
    if dataset is not None and dataset not in sequence:
        raise KeyError(f"dataset {dataset!r} is not in the sequence ({', '.join(sequence)})")
    manifests = [layout.manifest_file(ds, "test") for ds in sequence]
    names = [class_names_of(read_manifest(m)) for m in manifests]
    tokens = [_prompt_tokens(m, config["datasets"][ds], model.model.clip).to(device)
              for m, ds in zip(manifests, sequence)]
    return calibrated_predictions(model, loader, names, tokens, sequence, device, spec["gpu_precision"],
                                  None if dataset is None else sequence.index(dataset))


def evaluation_sets(config: dict, spec: dict, manifest: str | None) -> tuple[list[str], list[dict]]:
    """What an MTIL run's evaluation reads again (``ifcl run evaluate``): the test manifests of its sequence with
    their prompt templates, or ``manifest`` with the template of the sequence's dataset of the same classes (else
    the default)."""
    if manifest is None:
        return ([layout.manifest_file(ds, "test") for ds in spec["sequence"]],
                [{"template": config["datasets"][ds].get("template")} for ds in spec["sequence"]])
    names = class_names_of(read_manifest(manifest))
    same = [ds for ds in spec["sequence"] if class_names_of(read_manifest(layout.manifest_file(ds, "test"))) == names]
    return [manifest], [{"template": config["datasets"][same[0]].get("template") if same else None}]


def evaluate_run(config: dict, spec: dict, model: dict, run: str | Path, task: int, manifest: str | None,
                 tmp: str) -> None:
    """Rule evaluate_diki's step on a run folder's files (``ifcl run evaluate``): on the sequence's test sets, or on
    ``manifest`` (its frozen features computed by rule frozen_features' step first, its prompts with the template of
    the sequence's dataset of the same classes, else the default); its eval.json in ``tmp``. ``model``: the
    experiment's model settings, as the rule's (:func:`ifcl.registry.model_settings`)."""
    backbone = config["backbones"][spec["backbone"]]
    weights = backbone_weights_file(spec["backbone"], backbone)
    tests, prompts = evaluation_sets(config, spec, manifest)
    if manifest is None:
        features = [layout.features_file(spec["backbone"], ds, "test") for ds in spec["sequence"]]
    else:
        features = [f"{tmp}/features.safetensors"]
        frozen_features(FrozenFeatures(backbone=backbone, dataset=prompts[0], weights=weights,
                                                 manifest=manifest, out=features[0]))
    evaluate(Evaluate(
        t=task, model=model, calibration=spec["calibration"],
        eval_batch_size=spec["eval_batch_size"], datasets=prompts, backbone=backbone, precision=spec["gpu_precision"],
        weights=weights, gaussians=[str(layout.in_run(run, s, layout.GAUSSIAN)) for s in range(task + 1)],
        prefixes=[str(layout.in_run(run, s, layout.PREFIX)) for s in range(task + 1)], tests=tests, features=features, out=f"{tmp}/{layout.EVAL}"))
