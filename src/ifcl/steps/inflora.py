"""The steps of a class-incremental run of the InfLoRA family (seq-lora, InfLoRA, InfLoRA-b5, InfLoRA+CA), one
Snakemake rule each, and "the model after task t" rebuilt from a run's files (file layout: :mod:`ifcl.layout`).

Per task t: :func:`design` (R_t) -> :func:`train` (E_t, head t) -> :func:`memory` (InfLoRA) ->
:func:`class_stats` and :func:`align` (InfLoRA+CA) -> :func:`evaluate`. A step gets the files of the finished
tasks as explicit lists (``reductions``, ``adapters``: tasks 0..t-1, or 0..t once task t is trained). The frozen
backbone is never copied into a run: states name it and record its file's digest.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import layout
from ..files import file_sha256, read_json, write_csv
from ..methods.classifier_alignment import align_heads, class_statistics
from ..methods.inflora import LayerMemory, design_reduction, threshold, update_memory
from ..models.vit_lora import (ViTLoRA, heads_state, load_backbone, load_heads, random_reduction, reduction_state,
                               split_reduction_state)
from ..progress import track
from ..runtime import derive_seed, full_precision, start
from ..state import load_state, save_state
from ..training import predict_logits, train_classifier
from .cil import evaluate_seen, task_loader

CLASS_STATS_BATCH = 64  # the batch size of the CA feature pass (it changes nothing but speed)


# ---- the model after task t ----

def aligned_heads_task(experiment: dict, t: int) -> bool:
    """Whether the heads after task t are the aligned ones (InfLoRA+CA from task 1 on; the workflow's side of the
    same fact is :func:`ifcl.catalog.inflora.uses_alignment`, which this module does not import: a step's code
    digest covers its own modules only)."""
    return experiment["method"] == "inflora-ca" and t >= 1


def build_model(model: dict, backbone: dict, weights: str | Path) -> ViTLoRA:
    """The frozen backbone with a LoRA branch on the k and v projections of ``model['lora_blocks']``."""
    vit = load_backbone(backbone, weights)
    if model["final_norm"] == "reset":
        # InfLoRA_CA1 (CIFAR-100) replaces the pretrained final LayerNorm by a fresh one, never trained
        vit.norm = torch.nn.LayerNorm(vit.embed_dim).requires_grad_(False)
    return ViTLoRA(vit, rank=model["rank"], lora_blocks=model["lora_blocks"])


def begin_task_from_file(model: ViTLoRA, reduction_file: str | Path, num_classes: int) -> None:
    tensors, _ = load_state(reduction_file)
    down_k, down_v = split_reduction_state(model.lora_blocks, tensors)
    model.begin_task(down_k, down_v, num_classes)


def replay(model: ViTLoRA, reductions: list[str], adapters: list[str], tasks: dict) -> ViTLoRA:
    """Install and merge the finished tasks 0..s-1 from their files (s = len(reductions)): the model after task s-1."""
    if len(reductions) != len(adapters):
        raise ValueError(f"{len(reductions)} reduction files but {len(adapters)} adapter files")
    for s, (reduction, adapter) in enumerate(zip(reductions, adapters)):
        begin_task_from_file(model, reduction, len(tasks["tasks"][s]))
        model.load_current_adapter(load_state(adapter)[0])
        model.end_task()
    return model


def model_after_task(experiment: dict, backbone: dict, weights: str | Path, run: str | Path, t: int) -> ViTLoRA:
    """"The model after task t" of a run folder, ready for inference (eval mode, CPU)."""
    tasks = read_json(Path(run) / layout.TASKS)
    files = [(layout.in_run(run, s, layout.REDUCTION), layout.in_run(run, s, layout.ADAPTER)) for s in range(t + 1)]
    model = replay(build_model(experiment, backbone, weights), [r for r, _ in files], [a for _, a in files], tasks)
    if aligned_heads_task(experiment, t):
        load_heads(model.heads, load_state(layout.in_run(run, t, layout.ALIGNED_HEADS))[0])
    return model.eval()


# ---- InfLoRA's collection passes: designed subspaces and memories ----

@torch.no_grad()
def collect_second_moments(model: ViTLoRA, loader, device) -> list[torch.Tensor]:
    """C = XᵀX / n of every adapted layer's input over every token of every image of ``loader`` (float32 forward
    and float32 sums under any precision, as the official code computes it; divided once at the end)."""
    for layer in model.lora_layers:
        layer.start_collecting()
    with full_precision():
        for x, _ in track(loader, "collect inputs"):
            model.features(x.to(device))
    return [layer.stop_collecting() for layer in model.lora_layers]


def save_memory(path: str | Path, lora_blocks: list[int], memories: list[LayerMemory], meta: dict) -> None:
    tensors = {f"blocks.{i}.basis": m.basis for i, m in zip(lora_blocks, memories)}
    kinds = {str(i): m.kind for i, m in zip(lora_blocks, memories)}
    old_dims = {str(i): m.old_space_dim() for i, m in zip(lora_blocks, memories)}
    save_state(path, tensors, {**meta, "kind": "memory", "layer_kinds": kinds, "old_space_dims": old_dims})


def load_memory(path: str | Path, lora_blocks: list[int]) -> list[LayerMemory]:
    tensors, meta = load_state(path)
    return [LayerMemory(tensors[f"blocks.{i}.basis"], meta["layer_kinds"][str(i)]) for i in lora_blocks]


@dataclass(frozen=True, kw_only=True)
class OnImages:
    """What every step that runs the model on a task's images gets: the model's settings, the backbone, the run's
    task split, the finished tasks' files, and the images (manifest, decoded-image cache, loader workers)."""

    t: int
    model: dict  # method, rank, lora_blocks, backbone, final_norm
    backbone: dict
    weights: str
    tasks: str
    manifest: str
    reductions: list[str]
    adapters: list[str]
    decoded: str | None = None
    loader_workers: int = 0
    threads: int = 1


@dataclass(frozen=True, kw_only=True)
class Collection(OnImages):
    """A collection pass over task t's training images (the official passes: training transform, shuffled
    loader), with the finished tasks ``reductions``/``adapters`` merged."""

    exp: str
    seed: int
    collect: dict  # batch_size, dataset (its transforms)
    out: str
    previous_memory: str | None = None  # the memory after task t-1 (t >= 1)


def _collect(step: Collection, stage: str) -> tuple[list[int], list[torch.Tensor]]:
    job_seed = derive_seed(step.exp, step.seed, step.t, stage)
    device = start(step.threads, job_seed)
    tasks = read_json(step.tasks)
    model = replay(build_model(step.model, step.backbone, step.weights), step.reductions, step.adapters, tasks)
    model = model.to(device).eval()
    loader = task_loader(step.manifest, tasks["tasks"][step.t], tasks, step.collect["dataset"], step.backbone, True,
                         step.collect["batch_size"], device, job_seed, step.decoded, step.loader_workers)
    return model.lora_blocks, collect_second_moments(model, loader, device)


def _previous_memory(step: Collection, blocks: list[int]) -> list[LayerMemory | None]:
    return load_memory(step.previous_memory, blocks) if step.t else [None] * len(blocks)


@dataclass(frozen=True)
class RandomReduction:
    """seq-lora's R_t: LoRA's random init (no data)."""

    exp: str
    seed: int
    t: int
    model: dict
    backbone: dict
    weights: str
    out: str
    threads: int = 1


def _reduction_meta(model: dict, t: int, weights: str) -> dict:
    return {"kind": "reduction", "method": model["method"], "task": t, "rank": model["rank"],
            "backbone_sha256": file_sha256(weights)}


def random_reductions(exp: str, seed: int, t: int, embed_dim: int, n_layers: int, rank: int):
    """seq-lora's down-projections: LoRA's default init, one draw per adapted block for k and for v."""
    gen = torch.Generator().manual_seed(derive_seed(exp, seed, t, "reduction"))
    down_k, down_v = [], []
    for _ in range(n_layers):
        down_k.append(random_reduction(embed_dim, rank, gen))
        down_v.append(random_reduction(embed_dim, rank, gen))
    return down_k, down_v


def random_design(step: RandomReduction) -> None:
    """Rule reduction, seq-lora: R_t drawn as LoRA initialises it, from the job's own seed."""
    model = build_model(step.model, step.backbone, step.weights)
    down_k, down_v = random_reductions(step.exp, step.seed, step.t, model.embed_dim, len(model.lora_blocks),
                                       step.model["rank"])
    save_state(step.out, reduction_state(model.lora_blocks, down_k, down_v),
               _reduction_meta(step.model, step.t, step.weights))


def design(step: Collection) -> None:
    """Rule reduction, InfLoRA: R_t designed from the task's inputs, orthogonal to the old tasks' space kept in
    the memory of task t-1 (``liangyanshuo/InfLoRA methods/inflora.py``); the same R_t for k and v."""
    blocks, covs = _collect(step, "design")
    downs = [design_reduction(c, m, step.model["rank"]) for c, m in zip(covs, _previous_memory(step, blocks))]
    save_state(step.out, reduction_state(blocks, downs, downs), _reduction_meta(step.model, step.t, step.weights))


@dataclass(frozen=True, kw_only=True)
class Memory(Collection):
    """Rule memory: the collection pass with task t's trained branch merged, and the experiment's memory settings
    under their config names."""

    lamb: float
    lame: float
    memory: str  # dualgpm | gpm
    num_tasks: int


def memory(step: Memory) -> None:
    """The (Dual)GPM memory after task t, from the task's inputs with its trained branch."""
    blocks, covs = _collect(step, "memory")
    eps = threshold(step.t, step.num_tasks, step.lamb, step.lame)
    memories = [update_memory(p, c, eps, dual=step.memory == "dualgpm")
                for p, c in zip(_previous_memory(step, blocks), covs)]
    print(f"threshold {eps:.4f}; old-space dimensions per layer: {[m.old_space_dim() for m in memories]}")
    save_memory(step.out, blocks, memories, {"method": step.model["method"], "task": step.t, "threshold": eps,
                                             "update": step.memory, "backbone_sha256": file_sha256(step.weights)})


# ---- training ----

@dataclass(frozen=True, kw_only=True)
class Train(OnImages):
    """Rule train_task: task t's R_t on top of the finished tasks."""

    exp: str
    seed: int
    train: dict  # the task's optimisation settings (train with its task_overrides)
    dataset: dict  # train_transform, crop_scale
    precision: str
    reduction: str
    adapter: str
    log_csv: str


def train(step: Train) -> None:
    """Train E_t (k and v of every adapted block) and head t on task t's classes, old tasks merged and frozen."""
    job_seed = derive_seed(step.exp, step.seed, step.t, "train")
    device = start(step.threads, job_seed)
    tasks = read_json(step.tasks)
    model = replay(build_model(step.model, step.backbone, step.weights), step.reductions, step.adapters, tasks)
    begin_task_from_file(model, step.reduction, len(tasks["tasks"][step.t]))
    model.set_trainable()
    model.to(device).eval()  # no dropout/BN; the official loop also runs in eval mode
    known = sum(len(c) for c in tasks["tasks"][: step.t])
    loader = task_loader(step.manifest, tasks["tasks"][step.t], tasks, step.dataset, step.backbone, True,
                         step.train["batch_size"], device, job_seed, step.decoded, step.loader_workers)
    n_trainable = sum(p.numel() for p in model.trainable_parameters())
    print(f"task {step.t}: {len(loader.dataset)} images, {n_trainable} trainable parameters")
    rows = train_classifier(model.trainable_parameters(), model.forward_current, loader, step.train,
                            label_offset=known, device=device, desc=f"task {step.t}",
                            head_params=list(model.heads[-1].parameters()), precision=step.precision)
    write_csv(step.log_csv, rows)
    save_state(step.adapter, model.current_adapter_state(),
               {"kind": "adapter", "method": step.model["method"], "task": step.t, "train": step.train,
                "trainable_parameters": n_trainable, "backbone_sha256": file_sha256(step.weights)})


# ---- evaluation ----

@dataclass(frozen=True, kw_only=True)
class Evaluate(OnImages):
    """Rule evaluate_task: the model after task t (tasks 0..t merged, the aligned heads for InfLoRA+CA)."""

    eval_batch_size: int
    dataset: dict  # test_transform
    precision: str
    out: str
    heads: str | None = None


def evaluate(step: Evaluate) -> None:
    """Class-incremental evaluation after task t (:func:`ifcl.steps.cil.evaluate_seen`): the model after task t,
    its heads the aligned ones for InfLoRA+CA."""
    device = start(step.threads)
    tasks = read_json(step.tasks)
    model = replay(build_model(step.model, step.backbone, step.weights), step.reductions, step.adapters, tasks)
    if step.heads is not None:
        load_heads(model.heads, load_state(step.heads)[0])
    model = model.eval().to(device)
    evaluate_seen(model, tasks, step.t, step.manifest, step.dataset, step.backbone, step.eval_batch_size, device,
                  step.precision, step.out, step.decoded, step.loader_workers)


def evaluate_run(spec: dict, backbone: dict, weights: str, dataset: dict, run: Path, t: int, manifest: str,
                 out: str) -> None:
    """Rule evaluate_task's step on a run folder's files (``ifcl run evaluate``)."""
    def files(name):
        return [str(layout.in_run(run, s, name)) for s in range(t + 1)]

    heads = str(layout.in_run(run, t, layout.ALIGNED_HEADS)) if aligned_heads_task(spec, t) else None
    evaluate(Evaluate(t=t, model=spec, backbone=backbone, weights=weights, tasks=str(Path(run) / layout.TASKS),
                      manifest=manifest, reductions=files(layout.REDUCTION), adapters=files(layout.ADAPTER),
                      heads=heads, eval_batch_size=spec["eval_batch_size"], dataset=dataset,
                      precision=spec["gpu_precision"], out=out))


# ---- InfLoRA+CA: class statistics and classifier alignment ----

@dataclass(frozen=True, kw_only=True)
class ClassStats(OnImages):
    """Rule class_stats: the features of task t's training images under the model after task t."""

    covariance_eps: float
    dataset: dict  # test_transform
    out: str


@torch.no_grad()
def features(model: ViTLoRA, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logit features [n, D] (float32 forward under any precision) and targets of every image of ``loader``."""
    with full_precision():
        return predict_logits(model.features, loader, device, "fp32")


@torch.no_grad()
def class_stats(step: ClassStats) -> None:
    """InfLoRA+CA: per-class Gaussian of the features (all branches 0..t) of task t's training images under the
    test transform; old classes keep the statistics of their own task."""
    device = start(step.threads)
    tasks = read_json(step.tasks)
    model = replay(build_model(step.model, step.backbone, step.weights), step.reductions, step.adapters, tasks)
    model = model.to(device).eval()
    classes = tasks["tasks"][step.t]
    loader = task_loader(step.manifest, classes, tasks, step.dataset, step.backbone, False, CLASS_STATS_BATCH,
                         device, decoded=step.decoded, workers=step.loader_workers)
    feats, targets = features(model, loader, device)
    known = sum(len(c) for c in tasks["tasks"][: step.t])
    stats = [class_statistics(feats[targets == known + i], step.covariance_eps) for i in range(len(classes))]
    save_state(step.out, {"means": torch.stack([m for m, _ in stats]), "covs": torch.stack([c for _, c in stats])},
               {"kind": "class_stats", "task": step.t, "classes": classes,
                "backbone_sha256": file_sha256(step.weights)})


@dataclass(frozen=True)
class Align:
    """Rule align (t >= 1): the class statistics and trained heads of tasks 0..t, the aligned heads after t-1."""

    exp: str
    seed: int
    t: int
    ca: dict
    stats: list[str]
    adapters: list[str]
    heads: str
    log_csv: str
    previous: str | None = None
    threads: int = 1


def align(step: Align) -> None:
    """InfLoRA+CA after task t >= 1: align every head 0..t on features sampled from the class Gaussians, starting
    from the heads after task t-1's alignment and head t as trained."""
    torch.set_num_threads(step.threads)
    generator = torch.Generator().manual_seed(derive_seed(step.exp, step.seed, step.t, "align"))
    heads = torch.nn.ModuleList()
    for adapter_file in step.adapters:
        adapter, _ = load_state(adapter_file)
        out_features, in_features = adapter["head.weight"].shape
        heads.append(torch.nn.Linear(in_features, out_features))
        heads[-1].load_state_dict({"weight": adapter["head.weight"], "bias": adapter["head.bias"]})
    if step.previous is not None:
        load_heads(heads[: step.t], load_state(step.previous)[0])
    stats = [load_state(path)[0] for path in step.stats]
    means = torch.cat([st["means"] for st in stats])
    covs = torch.cat([st["covs"] for st in stats])
    class_tasks = [s for s, st in enumerate(stats) for _ in range(st["means"].shape[0])]
    rows = align_heads(heads, means, covs, class_tasks, step.ca, generator)
    write_csv(step.log_csv, rows)
    save_state(step.heads, heads_state(heads), {"kind": "aligned_heads", "task": step.t, "ca": step.ca})
