"""The steps of a run of the MTIL full fine-tuning family (Continual-FT, WiSE-FT, LwF, LwF-VR, iCaRL, ZSCL;
``ifcl.catalog.zscl``), one Snakemake rule each.

Task t fine-tunes every weight of the CLIP the previous task left (the zero-shot CLIP for task 0) on dataset t of
the sequence (:func:`train`: :func:`ifcl.methods.zscl.finetune`), and writes the whole model's weights
(``state.safetensors``); the evaluation after task t (:func:`evaluate`) tests that model on every dataset of the
sequence, each with its own class prompts. iCaRL then chooses its exemplars (:func:`select_memory`, the task's
``memory.safetensors``: which training images of which dataset). Images go through CLIP's preprocessing, as in
DIKI's steps (the official code gives its reference and exemplar images CLIP's test preprocessing too).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import layout
from ..data.captions import read_captions
from ..data.loader import DeviceBatches, ImageList, make_loader
from ..data.manifest import class_names_of, read_manifest
from ..data.transforms import make_transform
from ..files import file_sha256, write_csv, write_json
from ..methods.zscl import (Recipe, Reference, clip_logits, finetune, herding, interpolate, memory_after_task,
                            virtual_vocabulary)
from ..models.clip_prefix import load_clip, prompts, tokenize
from ..models.weights import backbone_weights_file
from ..progress import PassLog
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
    reference_images: str | None = None  # ZSCL: the reference images' manifest
    reference_texts: str | None = None  # ZSCL: a captions file, or a manifest whose class prompts are the texts
    reference_template: dict | None = None  # ZSCL: the prompt template of those class prompts
    memory: str | None = None  # iCaRL, t >= 1: the memory after task t - 1
    memory_manifests: list[str] | None = None  # iCaRL, t >= 1: the training manifests of datasets 0 … t - 1
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
                      workers=step.loader_workers, transform=cfg["transform"], crop_scale=cfg["crop_scale"])
    reference = _reference(step, clip, tokens, device)
    recipe = Recipe(lr=cfg["lr"][step.t], iterations=cfg["iterations"], warmup=cfg["warmup"],
                    weight_decay=cfg["weight_decay"], beta2=cfg["beta2"], label_smoothing=cfg["label_smoothing"],
                    distill_T=settings.get("temperature", 2.0), l2=settings.get("l2", 0.0),
                    average_every=settings.get("average_every"))
    log = PassLog(f"task {step.t}", len(loader), cfg["iterations"] + 1)
    print(f"task {step.t}: {len(loader.dataset)} images, {len(loader)} batches a pass, {cfg['iterations'] + 1} steps, "
          f"lr {recipe.lr:g}")
    weights = finetune(clip, lambda: iter(loader), tokens, recipe, reference, log)
    if name == "wise-ft":
        weights = interpolate(weights, {k: v.to(weights[k].device) for k, v in started.items()},
                              settings["wise_alpha"])
    write_csv(step.log_csv, log.rows)
    save_state(step.out, weights, {"kind": "finetuned_clip", "method": name, "task": step.t,
                                   "backbone_sha256": file_sha256(step.weights)})


def _reference(step: Train, clip, tokens: torch.Tensor, device) -> Reference | None:
    """What the task distils on, per method: LwF and LwF-VR the task's own images (shuffled apart from the training
    batches) against its class prompts or a virtual vocabulary, the teacher the model the task starts from; ZSCL the
    reference images (shuffled) against the reference texts, iCaRL its memory (in order) against the task's class
    prompts, both with the zero-shot CLIP as the teacher. None for the others (and iCaRL's task 0)."""
    name, settings, batch_size = step.model["method"], step.method, step.method["train"]["batch_size"]
    seed = derive_seed(step.exp, step.seed, step.t, "reference")
    if name in ("lwf", "lwf-vr"):
        teacher = copy.deepcopy(clip)
        if name == "lwf":
            texts = tokens
        else:
            gen = torch.Generator().manual_seed(derive_seed(step.exp, step.seed, step.t, "vocabulary"))
            texts = virtual_vocabulary(gen, clip.vocab_size, _special(clip, "start"), _special(clip, "end"),
                                       settings["vocabulary_length"], settings["vocabulary_size"], clip.context_length)
        images = _batches(step.manifest, step.backbone, batch_size, device, shuffle=True, seed=seed,
                          decoded=step.decoded, workers=step.loader_workers)
    elif name == "zscl":
        teacher = load_clip(step.backbone, step.weights)
        if step.reference_texts.endswith("captions.csv"):
            texts = tokenize(read_captions(step.reference_texts), clip.context_length)
        else:
            texts = tokenize(prompts(class_names_of(read_manifest(step.reference_texts)),
                                     step.reference_template.get("template")), clip.context_length)
        images = _batches(step.reference_images, step.backbone, batch_size, device, shuffle=True, seed=seed,
                          workers=step.loader_workers)
        print(f"reference: {len(images.dataset)} images, {len(texts)} texts")
    elif name == "icarl" and step.memory:
        teacher = load_clip(step.backbone, step.weights)
        texts = tokens
        images = _memory_batches(step.memory, step.memory_manifests, step.backbone, batch_size, device,
                                 step.loader_workers)
        print(f"memory: {len(images.dataset)} exemplars")
    else:
        return None
    return Reference(lambda: (x for x, _ in images), texts.to(device), teacher.to(device).requires_grad_(False))


def _image_list(paths: list[str], backbone: dict, batch_size: int, device, workers: int) -> DeviceBatches:
    """The images of ``paths`` in order under CLIP's preprocessing, in batches on ``device`` (labels are 0)."""
    transform = make_transform("clip", backbone["image_size"], backbone["mean"], backbone["std"])
    loader = make_loader(ImageList([(p, 0) for p in paths], transform), batch_size, False, num_workers=workers,
                         pin_memory=torch.device(device).type == "cuda")
    return DeviceBatches(loader, device, lambda x: x)


def _memory_paths(memory: str, manifests: list[str]) -> list[str]:
    """The exemplars' image files, dataset by dataset in sequence order (as the official memory is concatenated)."""
    tensors, _ = load_state(memory)
    rows = [read_manifest(m) for m in manifests]
    return [rows[int(d)][int(i)][0] for d, i in zip(tensors["dataset"], tensors["index"])]


def _memory_batches(memory: str, manifests: list[str], backbone: dict, batch_size: int, device, workers: int):
    return _image_list(_memory_paths(memory, manifests), backbone, batch_size, device, workers)


@dataclass(frozen=True)
class SelectMemory:
    """Rule select_memory: iCaRL's exemplars after task t."""

    t: int
    method: dict  # memory_size, candidates, herding_indices
    backbone: dict
    weights: str
    state: str
    manifest: str  # dataset t's training images
    out: str
    previous: str | None = None  # t >= 1: the memory after task t - 1
    eval_batch_size: int = 256
    loader_workers: int = 0
    threads: int = 1


@torch.no_grad()
def select_memory(step: SelectMemory) -> None:
    """The memory after task t (:func:`ifcl.methods.zscl.memory_after_task`): dataset t's exemplars chosen by
    :func:`ifcl.methods.zscl.herding` among its first ``candidates`` training images (in manifest order) on the
    L2-normalised image features of the model after task t."""
    device = start(step.threads)
    size, n = step.method["memory_size"], step.method["candidates"]
    candidates = [row[0] for row in read_manifest(step.manifest)][:n]
    kept: list[list[int]] = []
    chosen: list[int] = []
    if step.previous:
        tensors, _ = load_state(step.previous)
        for d in range(step.t):
            kept.append([int(i) for i, e in zip(tensors["index"], tensors["dataset"]) if int(e) == d])
        clip = finetuned_clip(step.backbone, step.weights, step.state).to(device).eval()
        features = torch.cat([clip.encode_image(x).float() for x, _ in
                              _image_list(candidates, step.backbone, step.eval_batch_size, device,
                                          step.loader_workers)])
        features = features / features.norm(dim=-1, keepdim=True)
        chosen = herding(features, size - size // (step.t + 1), step.method["herding_indices"] == "official")
    memory = memory_after_task(kept, step.t, size, len(candidates), chosen)
    dataset = torch.cat([torch.full((len(ids),), d, dtype=torch.long) for d, ids in enumerate(memory)])
    index = torch.tensor([i for ids in memory for i in ids], dtype=torch.long)
    print(f"after task {step.t}: {len(index)} exemplars, per dataset {[len(ids) for ids in memory]}")
    save_state(step.out, {"dataset": dataset, "index": index},
               {"kind": "icarl_memory", "task": step.t, "memory_size": size})


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
