"""Where the pipeline's files live: the one place that names them (rules, steps, ``ifcl.runs`` and the figures
all ask here).

A run is ``results/runs/<experiment>/seed<k>/`` (which files a task of a method has: its declaration's
``task_files``, :mod:`ifcl.registry`):

    tasks.json                         class-incremental runs: class order and the classes of each task
    task<t>/reduction.safetensors      InfLoRA family: down-projections R_t of every adapted block (k and v)
    task<t>/adapter.safetensors        InfLoRA family: trained up-projections E_t and head t
    task<t>/train_log.csv              one row per epoch
    task<t>/memory.safetensors         InfLoRA: the (Dual)GPM memory after task t (not after the last task)
    task<t>/class_stats.safetensors    InfLoRA+CA: mean and covariance of the features of task t's classes
    task<t>/aligned_heads.safetensors  InfLoRA+CA (t >= 1): every head after classifier alignment
    task<t>/align_log.csv              InfLoRA+CA (t >= 1): one row per alignment epoch
    task<t>/gaussian.safetensors       DIKI: mean and covariance of dataset t's frozen training features
    task<t>/prefix.safetensors         DIKI: the trained key/value prefixes of task t
    task<t>/state.safetensors          the state chain's methods: their model's task_state() after task t;
                                       the fine-tuning family: the CLIP's weights; MoE-Adapters: the experts, the
                                       routers of tasks 0..t and the experts frozen for the later tasks
    task<t>/autoencoder.safetensors    MoE-Adapters: task t's DDAS autoencoder
    task0/reference_autoencoder.safetensors  MoE-Adapters: DDAS's reference autoencoder (the zero-shot slot)
    task<t>/eval.json                  accuracy after task t (a row of the accuracy matrix)
    acc_matrix.csv, metrics.json       the run's matrix and metrics

Outside runs: backbones pretrained in the pipeline (``results/backbones/<backbone>/``), DIKI's frozen features
(``results/features/<backbone>/<dataset>/<split>.safetensors``), the summary and the figures.
"""
from __future__ import annotations

from pathlib import Path

RUNS = "results/runs"
RUN = RUNS + "/{exp}/seed{seed}"
TASK = RUN + "/task{t}"
MANIFEST = "data/prepared/{dataset}/{split}.csv"  # a prepared dataset split's manifest
FEATURES = "results/features/{backbone}/{dataset}/{split}.safetensors"
PRETRAINED = "results/backbones/{backbone}"  # a backbone pretrained in the pipeline: its weights and log
FETCHED = "data/weights/{model}.safetensors"  # a timm / open_clip backbone's hub weights
SUMMARY = "results/summary"
FIGURES = "results/figures"
RUN_FIGURES = FIGURES + "/{exp}/seed{seed}"

TASKS = "tasks.json"
ACC_MATRIX = "acc_matrix.csv"
METRICS = "metrics.json"
REDUCTION = "reduction.safetensors"
ADAPTER = "adapter.safetensors"
TRAIN_LOG = "train_log.csv"
MEMORY = "memory.safetensors"
CLASS_STATS = "class_stats.safetensors"
ALIGNED_HEADS = "aligned_heads.safetensors"
ALIGN_LOG = "align_log.csv"
GAUSSIAN = "gaussian.safetensors"
PREFIX = "prefix.safetensors"
AUTOENCODER = "autoencoder.safetensors"
REFERENCE_AUTOENCODER = "reference_autoencoder.safetensors"
STATE = "state.safetensors"
EVAL = "eval.json"
BACKBONE = "backbone.safetensors"
PRETRAIN_LOG = "pretrain_log.csv"


# ---- paths ----

def run_dir(exp: str, seed: int | str, root: str | Path = ".") -> Path:
    return Path(root) / RUN.format(exp=exp, seed=seed)


def run_file(exp: str, seed: int | str, name: str) -> str:
    return f"{RUN.format(exp=exp, seed=seed)}/{name}"


def task_file(exp: str, seed: int | str, t: int, name: str) -> str:
    return f"{TASK.format(exp=exp, seed=seed, t=t)}/{name}"


def task_pattern(name: str) -> str:
    """A task file with the wildcards {exp}, {seed} and {t} (a rule's output)."""
    return f"{TASK}/{name}"


def run_pattern(name: str) -> str:
    return f"{RUN}/{name}"


def in_run(run: str | Path, t: int, name: str) -> Path:
    """A task file of the run folder ``run``."""
    return Path(run) / f"task{t}" / name


def run_identity(run: str | Path) -> tuple[str, int]:
    """(experiment, seed) of a run folder."""
    run = Path(run)
    return run.parent.name, int(run.name.removeprefix("seed"))


def run_root(run: str | Path) -> Path:
    """The working directory a run folder lies in (where its data/ and results/ are)."""
    return Path(run).parents[RUN.count("/")]


def pretrained_file(backbone: str, name: str) -> str:
    return f"{PRETRAINED.format(backbone=backbone)}/{name}"


def manifest_file(dataset: str, split: str) -> str:
    """A prepared dataset split's manifest, relative to the working directory."""
    return MANIFEST.format(dataset=dataset, split=split)


def features_file(backbone: str, dataset: str, split: str) -> str:
    return FEATURES.format(backbone=backbone, dataset=dataset, split=split)


def task_folders(run: str | Path) -> list[tuple[int, Path]]:
    """(t, folder) of every ``task<t>`` folder of a run, in task order."""
    found = []
    for p in Path(run).iterdir():
        if p.is_dir() and p.name.startswith("task") and p.name[4:].isdigit():
            found.append((int(p.name[4:]), p))
    return sorted(found)
