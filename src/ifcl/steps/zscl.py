"""The steps of a run of the MTIL full fine-tuning family (Continual-FT, WiSE-FT, LwF, LwF-VR; ``ifcl.catalog.zscl``),
one Snakemake rule each.

Task t fine-tunes every weight of the CLIP the previous task left (the zero-shot CLIP for task 0) on dataset t of
the sequence (:func:`train`: :func:`ifcl.methods.zscl.finetune`), and writes the whole model's weights
(``state.safetensors``); the evaluation after task t (:func:`evaluate`) tests that model on every dataset of the
sequence, each with its own class prompts. Images go through CLIP's preprocessing, as in DIKI's steps.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import layout
from ..data.manifest import class_names_of, read_manifest
from ..files import file_sha256, write_csv, write_json
from ..methods.zscl import Recipe, Reference, clip_logits, finetune, interpolate, virtual_vocabulary
from ..models.clip_prefix import load_clip
from ..models.weights import backbone_weights_file
from ..progress import epoch_done
from ..runtime import derive_seed, seed_everything, start
from ..state import load_state, save_state
from .diki import _batches, _prompt_tokens, evaluation_sets


def finetuned_clip(backbone: dict, weights: str, state: str | None) -> torch.nn.Module:
    """The CLIP of the backbone with the weights of a task's state file (None: the zero-shot weights)."""
    clip = load_clip(backbone, weights)
    if state is not None:
        clip.load_state_dict(load_state(state)[0])
    return clip


def model_after_task(experiment: dict, backbone: dict, weights: str | Path, run: str | Path, t: int):
    """The fine-tuned CLIP after task ``t`` of a run folder (eval mode, CPU)."""
    return finetuned_clip(backbone, str(weights), str(layout.in_run(run, t, layout.STATE))).eval()


@dataclass(frozen=True)
class Train:
    """Rule train_finetune: task t of the sequence."""

    exp: str
    seed: int
    t: int
    model: dict  # method, backbone
    method: dict  # the method's own settings (train, wise_alpha, temperature, vocabulary_*)
    dataset: dict  # the prompt template
    backbone: dict
    weights: str
    manifest: str
    out: str
    log_csv: str
    previous: str | None = None  # t >= 1: the previous task's weights
    decoded: str | None = None
    loader_workers: int = 0
    threads: int = 1


def train(step: Train) -> None:
    """Fine-tune the CLIP the previous task left on dataset t; write the task's weights and its log (one row per
    pass over the dataset)."""
    device = start(step.threads)
    name, settings = step.model["method"], step.method
    cfg = settings["train"]
    seed_everything(derive_seed(step.exp, step.seed, step.t, "finetune"))
    clip = finetuned_clip(step.backbone, step.weights, step.previous).to(device).requires_grad_(True)
    started = {k: v.detach().clone() for k, v in clip.state_dict().items()}
    tokens = _prompt_tokens(step.manifest, step.dataset, clip).to(device)
    loader = _batches(step.manifest, step.backbone, cfg["batch_size"], device, shuffle=True,
                      seed=derive_seed(step.exp, step.seed, step.t, "data"), decoded=step.decoded,
                      workers=step.loader_workers)
    reference = None
    if name in ("lwf", "lwf-vr"):  # the teacher: the model the task starts from
        teacher = copy.deepcopy(clip).requires_grad_(False)
        if name == "lwf":
            ref_tokens = tokens
        else:
            gen = torch.Generator().manual_seed(derive_seed(step.exp, step.seed, step.t, "vocabulary"))
            ref_tokens = virtual_vocabulary(gen, clip.vocab_size, _special(clip, "start"), _special(clip, "end"),
                                            settings["vocabulary_length"], settings["vocabulary_size"],
                                            clip.context_length).to(device)
        images = _batches(step.manifest, step.backbone, cfg["batch_size"], device, shuffle=True,
                          seed=derive_seed(step.exp, step.seed, step.t, "reference"), decoded=step.decoded,
                          workers=step.loader_workers)
        reference = Reference(lambda: (x for x, _ in images), ref_tokens, teacher)
    recipe = Recipe(lr=cfg["lr"][step.t], iterations=cfg["iterations"], warmup=cfg["warmup"],
                    weight_decay=cfg["weight_decay"], beta2=cfg["beta2"], label_smoothing=cfg["label_smoothing"],
                    distill_T=settings.get("temperature", 2.0))
    per_pass, rows = len(loader), []
    passes = -(-(cfg["iterations"] + 1) // per_pass)
    current = {"loss": 0.0, "accuracy": 0.0, "steps": 0}  # the pass under way
    print(f"task {step.t}: {len(loader.dataset)} images, {per_pass} batches a pass, {cfg['iterations'] + 1} steps, "
          f"lr {recipe.lr:g}")
    began = time.perf_counter()

    def log(n: int, loss: float, lr: float, accuracy: float) -> None:
        """A row of the log per pass over the dataset (the last one may be partial)."""
        current["loss"] += loss
        current["accuracy"] += accuracy
        current["steps"] += 1
        if (n + 1) % per_pass == 0 or n == cfg["iterations"]:
            k = current["steps"]
            rows.append({"epoch": len(rows), "loss": current["loss"] / k, "train_accuracy": current["accuracy"] / k,
                         "lr_last": lr})
            epoch_done(f"task {step.t}", rows[-1]["epoch"], passes, time.perf_counter() - began, k,
                       loss=rows[-1]["loss"], accuracy=rows[-1]["train_accuracy"], lr=lr)
            current.update(loss=0.0, accuracy=0.0, steps=0)

    weights = finetune(clip, lambda: iter(loader), tokens, recipe, reference, log)
    if name == "wise-ft":
        weights = interpolate(weights, {k: v.to(weights[k].device) for k, v in started.items()},
                              settings["wise_alpha"])
    write_csv(step.log_csv, rows)
    save_state(step.out, weights, {"kind": "finetuned_clip", "method": name, "task": step.t,
                                   "backbone_sha256": file_sha256(step.weights)})


def _special(clip, which: str) -> int:
    """The start or end token of CLIP's tokenizer (the two last entries of its vocabulary)."""
    return clip.vocab_size - (2 if which == "start" else 1)


@dataclass(frozen=True)
class Evaluate:
    """Rule evaluate_finetune: every dataset of the sequence after task t (a row of the accuracy matrix)."""

    t: int
    eval_batch_size: int
    datasets: list  # the prompt template of every dataset of the sequence
    backbone: dict
    weights: str
    state: str
    tests: list[str]
    out: str
    decoded: list[str] | None = None
    loader_workers: int = 0
    threads: int = 1


@torch.no_grad()
def evaluate(step: Evaluate) -> None:
    """Accuracy on every dataset of the sequence (seen and unseen) of the model after task t."""
    device = start(step.threads)
    clip = finetuned_clip(step.backbone, step.weights, step.state).to(device).eval()
    accs = []
    for spec, test_csv, cache in zip(step.datasets, step.tests, step.decoded or [None] * len(step.tests)):
        text = clip.encode_text(_prompt_tokens(test_csv, spec, clip).to(device))
        correct = total = 0
        for x, y in _batches(test_csv, step.backbone, step.eval_batch_size, device, decoded=cache,
                             workers=step.loader_workers):
            correct += int((clip_logits(clip.encode_image(x), text, clip.logit_scale).argmax(1).cpu() == y).sum())
            total += len(y)
        accs.append(100.0 * correct / total)
    print(f"after task {step.t}: accuracy per dataset {[round(a, 2) for a in accs]}")
    write_json(step.out, {"task": step.t, "accuracy": accs})


def evaluate_run(config: dict, spec: dict, model: dict, run: str | Path, task: int, manifest: str | None,
                 tmp: str) -> None:
    """Rule evaluate_finetune's step on a run folder's files (``ifcl run evaluate``): on the sequence's test sets, or
    on ``manifest`` (with the template of the sequence's dataset of the same classes, else the default)."""
    backbone = config["backbones"][spec["backbone"]]
    tests, prompts = evaluation_sets(config, spec, manifest)
    evaluate(Evaluate(t=task, eval_batch_size=spec["eval_batch_size"], datasets=prompts, backbone=backbone,
                      weights=backbone_weights_file(spec["backbone"], backbone),
                      state=str(layout.in_run(run, task, layout.STATE)), tests=tests, out=f"{tmp}/{layout.EVAL}"))


@torch.no_grad()
def predictions(config: dict, spec: dict, model, loader, device, dataset: str | None = None) -> list[dict]:
    """``ifcl run predict``: per image the class among those of ``dataset`` (one of the sequence), or of every
    dataset of the sequence when None, and its softmax score."""
    sequence = spec["sequence"] if dataset is None else [dataset]
    if dataset is not None and dataset not in spec["sequence"]:
        raise KeyError(f"dataset {dataset!r} is not in the sequence ({', '.join(spec['sequence'])})")
    manifests = [layout.manifest_file(ds, "test") for ds in sequence]
    names = [n for m in manifests for n in class_names_of(read_manifest(m))]
    text = torch.cat([model.encode_text(_prompt_tokens(m, config["datasets"][ds], model).to(device))
                      for m, ds in zip(manifests, sequence)])
    rows = []
    for x, index in loader:
        probs = clip_logits(model.encode_image(x), text, model.logit_scale).float().softmax(1).cpu()
        score, pred = probs.max(1)
        rows += [{"image": int(i), "predicted_class": names[int(c)], "score": float(s)}
                 for i, c, s in zip(index, pred, score)]
    return rows
