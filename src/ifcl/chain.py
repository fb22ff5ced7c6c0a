"""The per-task chain of one run: file layout, and rebuilding "the model after task t" from explicit files.

A run directory ``results/runs/<experiment>/seed<k>/`` holds ``tasks.json`` and one folder per task:

    task<t>/reduction.safetensors   down-projections R_t of every adapted block (k and v)
    task<t>/adapter.safetensors     trained up-projections E_t and head t
    task<t>/train_log.csv           one row per epoch
    task<t>/memory.safetensors      InfLoRA: the (Dual)GPM memory after task t (not written after the last task)
    task<t>/class_stats.safetensors InfLoRA+CA: mean and covariance of the features of task t's classes
    task<t>/aligned_heads.safetensors InfLoRA+CA (t ≥ 1): every head after classifier alignment
    task<t>/eval.json               accuracy on every seen task after task t

The frozen backbone is never copied into a run: states name it and record its file's digest. The step functions
at the end (:func:`reduction`, :func:`train_task`, :func:`evaluate_task`) are what the Snakemake rules call.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import derive_seed, task_train_params, uses_alignment, uses_memory
from .data.loader import image_batches
from .files import file_sha256, read_json, write_csv, write_json
from .gpu import claim_device
from .methods.inflora import LayerMemory, design_reduction, threshold, update_memory
from .methods.classifier_alignment import align_heads, class_statistics
from .models.vit_lora import (ViTLoRA, heads_state, load_backbone, load_heads, random_reduction, reduction_state,
                              split_reduction_state)
from .state import load_state, save_state
from .training import autocast, per_task_accuracy, predict_logits, task_aware_predictions, task_of, train_classifier

REDUCTION = "reduction.safetensors"
ADAPTER = "adapter.safetensors"
MEMORY = "memory.safetensors"
CLASS_STATS = "class_stats.safetensors"
ALIGNED_HEADS = "aligned_heads.safetensors"


def task_dir(run_dir: str | Path, t: int) -> Path:
    return Path(run_dir) / f"task{t}"


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and Python for one job (each job derives its own seed, reference DESIGN "deterministic")."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def pick_device() -> torch.device:
    """The job's device: the GPU claimed for it (ifcl.gpu: inherited, or leased from the machine's), else the CPU."""
    if claim_device(log=lambda message: print(message, flush=True)) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print("torch cannot use CUDA here (CPU-only build or no driver): running on CPU", flush=True)
        return torch.device("cpu")
    return torch.device("cuda")


def build_model(backbone_spec: dict, backbone_weights: str | Path, experiment: dict) -> ViTLoRA:
    vit = load_backbone(backbone_spec, backbone_weights)
    if experiment.get("final_norm", "pretrained") == "reset":
        # InfLoRA_CA1 (CIFAR-100) replaces the pretrained final LayerNorm by a fresh one, never trained
        vit.norm = torch.nn.LayerNorm(vit.embed_dim).requires_grad_(False)
    return ViTLoRA(vit, rank=experiment["rank"], lora_blocks=experiment["lora_blocks"])


def begin_task_from_file(model: ViTLoRA, reduction_file: str | Path, num_classes: int) -> None:
    tensors, _ = load_state(reduction_file)
    down_k, down_v = split_reduction_state(model.lora_blocks, tensors)
    model.begin_task(down_k, down_v, num_classes)


def replay(model: ViTLoRA, run_dir: str | Path, tasks: dict, upto: int) -> ViTLoRA:
    """Install and merge the finished tasks 0..upto-1 from their files: the model after task upto-1."""
    for s in range(upto):
        begin_task_from_file(model, task_dir(run_dir, s) / REDUCTION, len(tasks["tasks"][s]))
        adapter, _ = load_state(task_dir(run_dir, s) / ADAPTER)
        model.load_current_adapter(adapter)
        model.end_task()
    return model


def aligned_heads_file(experiment: dict, run_dir: str | Path, t: int) -> Path | None:
    """InfLoRA+CA replaces every head after task t ≥ 1 by its aligned version."""
    if uses_alignment(experiment) and t >= 1:
        return task_dir(run_dir, t) / ALIGNED_HEADS
    return None


def model_after_task(backbone_spec: dict, backbone_weights: str | Path, experiment: dict, run_dir: str | Path, t: int) -> ViTLoRA:
    """"The model after task t" of a run, ready for inference (eval mode, CPU)."""
    tasks = read_json(Path(run_dir) / "tasks.json")
    model = replay(build_model(backbone_spec, backbone_weights, experiment), run_dir, tasks, t + 1)
    heads = aligned_heads_file(experiment, run_dir, t)
    if heads is not None:
        load_heads(model.heads, load_state(heads)[0])
    return model.eval()


# ---- steps of the chain (one Snakemake rule each) ----

def random_reductions(experiment_name: str, seed: int, task: int, embed_dim: int, n_layers: int, rank: int):
    """seq-lora's down-projections: LoRA's default init, one draw per adapted block for k and for v."""
    gen = torch.Generator().manual_seed(derive_seed(experiment_name, seed, task, "reduction"))
    down_k, down_v = [], []
    for _ in range(n_layers):
        down_k.append(random_reduction(embed_dim, rank, gen))
        down_v.append(random_reduction(embed_dim, rank, gen))
    return down_k, down_v


@torch.no_grad()
def collect_second_moments(model: ViTLoRA, loader, device) -> list[torch.Tensor]:
    """C = XᵀX / n of every adapted layer's input over every token of every image of ``loader``
    (reference/inflora.md §2.2; summed in float32, divided once at the end)."""
    for layer in model.lora_layers:
        layer.start_collecting()
    for x, _ in tqdm(loader, desc="collect inputs", leave=False, mininterval=5):
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


def _collect(experiment_name, experiment, seed, task, stage, dataset_spec, backbone_spec, backbone_weights, run_dir,
             train_csv, upto, threads, decoded):
    """Second moments of every adapted layer over task t's augmented training images (the official collection
    passes: training transform, shuffled loader) with the finished tasks < ``upto`` merged."""
    torch.set_num_threads(threads)
    job_seed = derive_seed(experiment_name, seed, task, stage)
    seed_everything(job_seed)
    tasks = read_json(Path(run_dir) / "tasks.json")
    device = pick_device()
    model = replay(build_model(backbone_spec, backbone_weights, experiment), run_dir, tasks, upto).to(device).eval()
    batch_size = task_train_params(experiment, task)["batch_size"]
    loader = _loader(train_csv, tasks["tasks"][task], tasks, dataset_spec, backbone_spec, True, batch_size, device,
                     job_seed, decoded)
    with autocast(device, experiment["gpu_precision"]):
        return model.lora_blocks, collect_second_moments(model, loader, device)


def reduction(experiment_name: str, experiment: dict, seed: int, task: int, dataset_spec: dict, backbone_spec: dict,
              backbone_weights: str, run_dir: str, train_csv: str, out: str, threads: int = 1,
              decoded: str | None = None) -> None:
    """Down-projections R_t of task t, frozen while the task trains.

    seq-lora: LoRA's random init. InfLoRA: designed from the task's inputs, orthogonal to the old tasks' space
    kept in the memory of task t-1 (reference/inflora.md §2); the same R_t for k and v."""
    meta = {"kind": "reduction", "method": experiment["method"], "task": task, "rank": experiment["rank"],
            "backbone_sha256": file_sha256(backbone_weights)}
    if not uses_memory(experiment):  # seq-lora
        model = build_model(backbone_spec, backbone_weights, experiment)
        down_k, down_v = random_reductions(experiment_name, seed, task, model.embed_dim, len(model.lora_blocks),
                                           experiment["rank"])
        save_state(out, reduction_state(model.lora_blocks, down_k, down_v), meta)
        return
    blocks, covs = _collect(experiment_name, experiment, seed, task, "design", dataset_spec, backbone_spec,
                            backbone_weights, run_dir, train_csv, task, threads, decoded)
    memories = load_memory(task_dir(run_dir, task - 1) / MEMORY, blocks) if task else [None] * len(blocks)
    downs = [design_reduction(c, m, experiment["rank"]) for c, m in zip(covs, memories)]
    save_state(out, reduction_state(blocks, downs, downs), meta)


def memory(experiment_name: str, experiment: dict, seed: int, task: int, dataset_spec: dict, backbone_spec: dict,
           backbone_weights: str, run_dir: str, train_csv: str, out: str, threads: int = 1,
           decoded: str | None = None) -> None:
    """The (Dual)GPM memory after task t, from the task's inputs with its trained branch (reference/inflora.md §3)."""
    blocks, covs = _collect(experiment_name, experiment, seed, task, "memory", dataset_spec, backbone_spec,
                            backbone_weights, run_dir, train_csv, task + 1, threads, decoded)
    previous = load_memory(task_dir(run_dir, task - 1) / MEMORY, blocks) if task else [None] * len(blocks)
    eps = threshold(task, experiment["num_tasks"], experiment["lamb"], experiment["lame"])
    dual = experiment["memory"] == "dualgpm"
    memories = [update_memory(p, c, eps, dual=dual) for p, c in zip(previous, covs)]
    print(f"threshold {eps:.4f}; old-space dimensions per layer: {[m.old_space_dim() for m in memories]}")
    save_memory(out, blocks, memories, {"method": experiment["method"], "task": task, "threshold": eps,
                                        "update": experiment["memory"], "backbone_sha256": file_sha256(backbone_weights)})


def _loader(manifest, classes, tasks, dataset_spec, backbone_spec, train: bool, batch_size: int, device, seed: int = 0,
            decoded: str | None = None):
    """Batches on ``device`` of the manifest's images of ``classes``: ``train``: the training transform, shuffled;
    else the test transform in manifest order. ``decoded``: read from that decoded-image cache."""
    name = dataset_spec["train_transform"] if train else dataset_spec["test_transform"]
    return image_batches(manifest, classes, tasks["class_order"], name, backbone_spec, batch_size, shuffle=train,
                         seed=seed, device=device, crop_scale=dataset_spec["crop_scale"], decoded=decoded)


def train_task(experiment_name: str, experiment: dict, seed: int, task: int, train_cfg: dict, dataset_spec: dict,
               backbone_spec: dict, backbone_weights: str, run_dir: str, train_csv: str, adapter_out: str, log_out: str,
               threads: int = 1, decoded: str | None = None) -> None:
    """Train E_t (k and v of every adapted block) and head t on task t's classes, old tasks merged and frozen."""
    torch.set_num_threads(threads)
    job_seed = derive_seed(experiment_name, seed, task, "train")
    seed_everything(job_seed)
    tasks = read_json(Path(run_dir) / "tasks.json")
    device = pick_device()
    model = replay(build_model(backbone_spec, backbone_weights, experiment), run_dir, tasks, task)
    begin_task_from_file(model, task_dir(run_dir, task) / REDUCTION, len(tasks["tasks"][task]))
    model.set_trainable()
    model.to(device).eval()  # no dropout/BN; the official loop also runs in eval mode (reference/inflora.md §4.2)
    known = sum(len(c) for c in tasks["tasks"][:task])
    loader = _loader(train_csv, tasks["tasks"][task], tasks, dataset_spec, backbone_spec, True, train_cfg["batch_size"],
                     device, job_seed, decoded)
    n_trainable = sum(p.numel() for p in model.trainable_parameters())
    print(f"task {task}: {len(loader.dataset)} images, {n_trainable} trainable parameters")
    rows = train_classifier(model.trainable_parameters(), model.forward_current, loader, train_cfg,
                            label_offset=known, device=device, desc=f"task {task}",
                            head_params=list(model.heads[-1].parameters()), precision=experiment["gpu_precision"])
    write_csv(log_out, rows)
    save_state(adapter_out, model.current_adapter_state(),
               {"kind": "adapter", "method": experiment["method"], "task": task, "train": train_cfg,
                "trainable_parameters": n_trainable, "backbone_sha256": file_sha256(backbone_weights)})


def evaluate_task(experiment: dict, task: int, dataset_spec: dict, backbone_spec: dict, backbone_weights: str,
                  run_dir: str, test_csv: str, out: str, threads: int = 1, decoded: str | None = None) -> None:
    """Class-incremental evaluation after task t: arg-max over every seen head on the test images of all seen
    classes (task-agnostic); one accuracy per seen task (a row of the accuracy matrix)."""
    torch.set_num_threads(threads)
    tasks = read_json(Path(run_dir) / "tasks.json")
    device = pick_device()
    model = model_after_task(backbone_spec, backbone_weights, experiment, run_dir, task).to(device)
    seen = [c for t in tasks["tasks"][: task + 1] for c in t]
    loader = _loader(test_csv, seen, tasks, dataset_spec, backbone_spec, False, experiment["eval_batch_size"], device,
                     decoded=decoded)
    start = time.perf_counter()
    logits, targets = predict_logits(model, loader, device, experiment["gpu_precision"])
    sizes = [len(c) for c in tasks["tasks"][: task + 1]]
    preds = logits.argmax(1)
    accs, counts = per_task_accuracy(preds, targets, sizes)
    til_accs, _ = per_task_accuracy(task_aware_predictions(logits, targets, sizes), targets, sizes)
    total = 100.0 * float((preds == targets).float().mean())
    task_id = 100.0 * float((task_of(preds, sizes) == task_of(targets, sizes)).float().mean())
    print(f"after task {task}: accuracy {total:.2f}% on {len(targets)} images; per task {[round(a, 2) for a in accs]}; "
          f"task-aware per task {[round(a, 2) for a in til_accs]}; task-id accuracy {task_id:.2f}% "
          f"({time.perf_counter() - start:.1f} s)")
    write_json(out, {"task": task, "accuracy": total, "per_task_accuracy": accs, "per_task_count": counts,
                     "per_task_accuracy_task_aware": til_accs, "task_id_accuracy": task_id})


@torch.no_grad()
def class_stats(experiment: dict, task: int, dataset_spec: dict, backbone_spec: dict, backbone_weights: str,
                run_dir: str, train_csv: str, out: str, threads: int = 1, decoded: str | None = None) -> None:
    """InfLoRA+CA: per-class Gaussian of the features (all branches 0..t) of task t's training images under the
    test transform (reference/inflora.md §5.2); old classes keep the statistics of their own task."""
    torch.set_num_threads(threads)
    tasks = read_json(Path(run_dir) / "tasks.json")
    device = pick_device()
    model = replay(build_model(backbone_spec, backbone_weights, experiment), run_dir, tasks, task + 1).to(device).eval()
    classes = tasks["tasks"][task]
    loader = _loader(train_csv, classes, tasks, dataset_spec, backbone_spec, False, 64, device, decoded=decoded)
    feats, targets = predict_logits(model.features, loader, device, experiment["gpu_precision"])
    known = sum(len(c) for c in tasks["tasks"][:task])
    stats = [class_statistics(feats[targets == known + i], experiment["ca"]["covariance_eps"]) for i in range(len(classes))]
    save_state(out, {"means": torch.stack([m for m, _ in stats]), "covs": torch.stack([c for _, c in stats])},
               {"kind": "class_stats", "task": task, "classes": classes, "backbone_sha256": file_sha256(backbone_weights)})


def align(experiment_name: str, experiment: dict, seed: int, task: int, run_dir: str, out: str, log_out: str,
          threads: int = 1) -> None:
    """InfLoRA+CA after task t ≥ 1: align every head 0..t on features sampled from the class Gaussians, starting
    from the heads after task t-1's alignment and head t as trained (reference/inflora.md §5.2)."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(derive_seed(experiment_name, seed, task, "align"))
    heads = torch.nn.ModuleList()
    for s in range(task + 1):
        adapter, _ = load_state(task_dir(run_dir, s) / ADAPTER)
        out_features, in_features = adapter["head.weight"].shape
        heads.append(torch.nn.Linear(in_features, out_features))
        heads[-1].load_state_dict({"weight": adapter["head.weight"], "bias": adapter["head.bias"]})
    previous = aligned_heads_file(experiment, run_dir, task - 1)
    if previous is not None:
        load_heads(heads[:task], load_state(previous)[0])
    stats = [load_state(task_dir(run_dir, s) / CLASS_STATS)[0] for s in range(task + 1)]
    means = torch.cat([st["means"] for st in stats])
    covs = torch.cat([st["covs"] for st in stats])
    class_tasks = [s for s, st in enumerate(stats) for _ in range(st["means"].shape[0])]
    rows = align_heads(heads, means, covs, class_tasks, experiment["ca"], generator)
    write_csv(log_out, rows)
    save_state(out, heads_state(heads), {"kind": "aligned_heads", "task": task, "ca": experiment["ca"]})
