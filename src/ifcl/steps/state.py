"""The class-incremental protocol's generic rule chain ("state"): the steps of a run of any method whose task adds
one state file to a frozen ViT (L2P, DualPrompt, CODA-Prompt, SD-LoRA, a researcher's own method), one Snakemake
rule each, and "the model after task t" rebuilt from a run's files (file layout: :mod:`ifcl.layout`).

Per task t: :func:`train` (from the files of tasks 0..t-1) -> :func:`evaluate` (the files of tasks 0..t). Task t's
file ``state.safetensors`` is the model's ``task_state()``. The model comes from the method's declaration
(:attr:`ifcl.registry.Method.model`, "module:function" called with the model settings, the frozen ViT and a seed):

* the prompt methods (:func:`ifcl.models.vit_prompt.build`): the whole pool after task t (keys, prompts and, for
  CODA-Prompt, the attention vectors; the pool is shared by the tasks) and head t;
* SD-LoRA (:func:`ifcl.models.vit_sdlora.build`): task t's LoRA factors on q and v of every adapted block, head t
  and the magnitudes α_0..α_t after task t.

A model of this chain has ``begin_task(num_classes, task, generator)``, ``trainable_parameters()``,
``forward_current(x, task)`` (logits of the new head, or ``(logits, extra_loss)``), ``forward(x)`` (logits of every
seen class), ``heads`` (one module per task), ``task_state()`` and ``load_task_state(state)`` (append a finished
task): the model after task t is the frozen backbone with the states of tasks 0..t loaded in order. A model with
``fit_task(batches, known)`` (RanPAC: :class:`ifcl.models.vit_ranpac.RanPACViT`) fits its task in closed form
instead of being trained by an optimiser, on the images under its declaration's ``task_images`` transform; it
returns the task's log rows.

Optional hooks of such a model: ``begin_epoch(epoch)`` before each training epoch and ``end_step()`` after each
optimiser step (LAE: the online module frozen in the first epochs, the offline module's moving average); and, for a
method whose declaration names ``statistics_images``, ``finish_task(batches, known, train_batches)`` after the
training pass and before ``task_state()``: ``batches`` the task's training images under that transform in manifest
order (class statistics, prototypes, a classifier alignment: SLCA, EASE, MOS, HiDe-Prompt), ``train_batches`` the
training pass's own loader, shuffled anew (HiDe-Prompt trains its task-identity model on it); it returns extra rows
of the task's training log, each with a ``stage`` (its name: the figures' training curves leave such rows out).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .. import layout
from ..files import file_sha256, read_json, write_csv
from ..models.vit_lora import load_backbone
from ..registry import load_object, method, model_settings
from ..runtime import derive_seed, start
from ..state import load_state, save_state
from ..training import train_classifier
from .cil import evaluate_seen, task_loader

def build_model(model: dict, backbone: dict, weights: str | Path, seed: int = 0) -> nn.Module:
    """The frozen backbone with the method's parts before any task (``model``: :func:`ifcl.registry.model_settings`),
    built by the function its declaration names; what it draws comes from ``seed``."""
    return load_object(method(model["method"]).model)(model, load_backbone(backbone, weights), seed)


def replay(model: nn.Module, states: list[str]) -> nn.Module:
    """Load the task files of tasks 0..s in order: the model after task s."""
    for path in states:
        model.load_task_state(load_state(path)[0])
    return model


def model_after_task(experiment: dict, backbone: dict, weights: str | Path, run: str | Path, t: int) -> nn.Module:
    """"The model after task t" of a run folder, ready for inference (eval mode, CPU)."""
    files = [layout.in_run(run, s, layout.STATE) for s in range(t + 1)]
    return replay(build_model(model_settings(experiment), backbone, weights), files).eval()


@dataclass(frozen=True, kw_only=True)
class Train:
    """Rule train_state: task t's images and the files of tasks 0..t-1 (``previous``)."""

    exp: str
    seed: int
    t: int
    model: dict  # model_settings
    backbone: dict
    weights: str
    tasks: str
    manifest: str
    train: dict  # the task's optimisation settings
    dataset: dict  # train_transform, test_transform, crop_scale
    transform: str = "train_transform"  # the key of dataset whose transform the task's pass applies
    drop_last: bool = False  # the task's loader drops its last partial batch (the method's official loader does)
    statistics: str | None = None  # the key of dataset whose transform the pass for the model's finish_task applies
    statistics_decoded: str | None = None
    precision: str
    out: str
    log_csv: str
    previous: list[str]
    decoded: str | None = None
    loader_workers: int = 0
    threads: int = 1


def train(step: Train) -> None:
    """Train task t: what the method adds for it and its head, on task t's classes, with a fresh optimiser over
    the model's ``trainable_parameters()``. The loss is the cross-entropy of head t (the official losses mask the
    old classes' logits: the same thing) plus the model's extra loss, if its ``forward_current`` returns one (the
    prompt methods' key or orthogonality loss, ``GT-RIPL/CODA-Prompt learners/prompt.py``; none for SD-LoRA,
    ``WuYichen-97/SD-Lora-CL models/sdlora.py``)."""
    job_seed = derive_seed(step.exp, step.seed, step.t, "train")
    device = start(step.threads, job_seed)
    tasks = read_json(step.tasks)
    model = build_model(step.model, step.backbone, step.weights, derive_seed(step.exp, step.seed, 0, "pool"))
    replay(model, step.previous)
    model.begin_task(len(tasks["tasks"][step.t]), step.t, torch.Generator().manual_seed(job_seed))
    model.to(device).eval()  # no dropout in the backbones; the official loops' train mode changes nothing
    known = sum(len(c) for c in tasks["tasks"][: step.t])
    loader = task_loader(step.manifest, tasks["tasks"][step.t], tasks, step.dataset, step.backbone, True,
                         step.train["batch_size"], device, job_seed, step.decoded, step.loader_workers, step.transform,
                         step.drop_last)
    if len(loader) == 0:
        raise ValueError(f"task {step.t}: {len(loader.dataset)} images, fewer than one batch of "
                         f"{step.train['batch_size']}, and the method's loader drops the last partial batch")
    params = model.trainable_parameters()
    n_trainable = sum(p.numel() for p in params)
    print(f"task {step.t}: {len(loader.dataset)} images ({step.dataset[step.transform]}), {n_trainable} trainable "
          f"parameters")
    if hasattr(model, "fit_task"):  # a closed-form fit of the task's statistics, no optimiser (RanPAC)
        rows = model.fit_task(loader, known)
    else:
        rows = train_classifier(params, lambda x: model.forward_current(x, step.t), loader, step.train,
                                label_offset=known, device=device, desc=f"task {step.t}",
                                head_params=list(model.heads[-1].parameters()), precision=step.precision,
                                on_epoch=getattr(model, "begin_epoch", None), on_step=getattr(model, "end_step", None),
                                state=model)
    if step.statistics is not None:  # class statistics after training (SLCA's, MOS's Gaussians; EASE's prototypes)
        batches = task_loader(step.manifest, tasks["tasks"][step.t], tasks, step.dataset, step.backbone, False,
                              step.train["batch_size"], device, decoded=step.statistics_decoded,
                              workers=step.loader_workers, transform=step.statistics)
        rows += model.finish_task(batches, known, loader)
    write_csv(step.log_csv, rows)
    save_state(step.out, model.task_state(), {
        "kind": "task_state", "method": step.model["method"], "task": step.t, "train": step.train,
        "trainable_parameters": n_trainable, "backbone_sha256": file_sha256(step.weights)})


@dataclass(frozen=True, kw_only=True)
class Evaluate:
    """Rule evaluate_state: the files of tasks 0..t."""

    t: int
    model: dict
    backbone: dict
    weights: str
    tasks: str
    manifest: str
    states: list[str]
    eval_batch_size: int
    dataset: dict  # test_transform
    precision: str
    out: str
    decoded: str | None = None
    loader_workers: int = 0
    threads: int = 1


def evaluate(step: Evaluate) -> None:
    """Class-incremental evaluation after task t (:func:`ifcl.steps.cil.evaluate_seen`): the logits of every seen
    head (for the prompt methods, with the prompts each image's query selects)."""
    device = start(step.threads)
    tasks = read_json(step.tasks)
    model = replay(build_model(step.model, step.backbone, step.weights), step.states).eval().to(device)
    evaluate_seen(model, tasks, step.t, step.manifest, step.dataset, step.backbone, step.eval_batch_size, device,
                  step.precision, step.out, step.decoded, step.loader_workers)


def evaluate_run(spec: dict, backbone: dict, weights: str, dataset: dict, run: Path, t: int, manifest: str,
                 out: str) -> None:
    """Rule evaluate_state's step on a run folder's files (``ifcl run evaluate``)."""
    evaluate(Evaluate(t=t, model=model_settings(spec), backbone=backbone, weights=weights,
                      tasks=str(Path(run) / layout.TASKS), manifest=manifest,
                      states=[str(layout.in_run(run, s, layout.STATE)) for s in range(t + 1)],
                      eval_batch_size=spec["eval_batch_size"], dataset=dataset, precision=spec["gpu_precision"],
                      out=out))
