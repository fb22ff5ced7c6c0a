"""The steps of a MoE-Adapters run (``ifcl.catalog.moe_adapters``; ``JiazuoYu/MoE-Adapters4CL``, folder ``mtil``),
one Snakemake rule each.

Task t trains, on dataset t of the sequence, its own router and every expert not frozen of the CLIP with
MoE-Adapters that the previous task left (:func:`train`: :func:`ifcl.methods.moe_adapters.train_task`), and writes
the experts, the routers of tasks 0..t and the experts frozen for the later tasks (``state.safetensors``: what the
model after task t and task t + 1's training need). DDAS's autoencoders are trained apart, as the official chooser
processes are (:func:`train_autoencoder`): task t's on dataset t (``autoencoder.safetensors``) and, once per run,
the reference one on the reference dataset (task 0's ``reference_autoencoder.safetensors``). The evaluation after
task t (:func:`evaluate`) sends each test batch through the router DDAS picks, or through the frozen CLIP, and
classifies it against the class prompts through the same router. Images go through CLIP's preprocessing (training:
the experiment's ``train.transform``), in float32 (the official code casts CLIP to float32; ``gpu_precision`` is
not read).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import layout
from ..data.manifest import class_names_of, read_manifest
from ..files import file_sha256, write_csv, write_json
from ..methods.moe_adapters import (DDASAutoencoder, Recipe, ddas_extractor, extractor_inputs, initial_autoencoder,
                                    train_autoencoder as train_slot, train_task, update_frozen)
from ..models.clip_moe import CLIPMoE, DDASModel
from ..models.clip_prefix import load_clip
from ..models.weights import backbone_weights_file, load_torchvision_weights
from ..progress import PassLog
from ..runtime import derive_seed, seed_everything, start
from ..state import load_state, save_state
from .diki import _batches, _prompt_tokens, evaluation_sets

FROZEN = "frozen."  # state keys of the experts frozen after the task: frozen.<tower>.<block>, a bool mask [experts]


def moe_model(model: dict, backbone: dict, weights: str) -> CLIPMoE:
    """The backbone's frozen CLIP with MoE-Adapters in every block of both towers (``model['experts']``: count,
    top_k, bottleneck, routers); experts at their initialisation (the global RNG), routers zero."""
    e = model["experts"]
    return CLIPMoE(load_clip(backbone, weights), num_experts=e["count"], top_k=e["top_k"], num_tasks=e["routers"],
                   bottleneck=e["bottleneck"])


def moe_state(moe: CLIPMoE, t: int, frozen: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """What task t leaves: every expert, the routers of tasks 0..t, and the frozen experts as masks."""
    tensors = moe.expert_state()
    for s in range(t + 1):
        tensors.update(moe.router_state(s))
    for name in moe.selection_counts():
        mask = torch.zeros(moe.num_experts, dtype=torch.bool)
        mask[frozen.get(name, [])] = True
        tensors[FROZEN + name] = mask
    return tensors


def load_moe_state(moe: CLIPMoE, path: str | Path) -> dict[str, list[int]]:
    """Load a task's experts and routers into ``moe``; return the experts frozen for the next task."""
    tensors, _ = load_state(path)
    moe.load_trainable_state({k: v for k, v in tensors.items() if not k.startswith(FROZEN)})
    return {k[len(FROZEN):]: torch.nonzero(v).flatten().tolist() for k, v in tensors.items() if k.startswith(FROZEN)}


def extractor(ddas: dict, weights: str | None) -> torch.nn.Module:
    """DDAS's AlexNet conv5 extractor: the fetched ImageNet weights (``alexnet-imagenet``) or seeded random ones."""
    if ddas["extractor"] == "alexnet-random":
        return ddas_extractor(None)
    if not weights:
        raise ValueError(f"ddas.extractor {ddas['extractor']} needs its weights file")
    return ddas_extractor(load_torchvision_weights(weights))


def load_autoencoder(path: str | Path) -> DDASAutoencoder:
    tensors, meta = load_state(path)
    ae = DDASAutoencoder(meta["input_dim"], meta["hidden"])
    ae.load_state_dict(tensors)
    return ae.eval()


def ddas_model(exp: str, seed: int, t: int, model: dict, ddas: dict, backbone: dict, weights: str, state: str,
               autoencoders: list[str], reference: str, extractor_weights: str | None) -> DDASModel:
    """The model after task t (CPU, eval mode): the experts and routers of its state, the reference autoencoder and
    those of tasks 0..t, and, with ``untrained_slots: score``, the initial weights of the later tasks' slots (one
    per router slot, as the official chooser file holds them all)."""
    moe = moe_model(model, backbone, weights)
    load_moe_state(moe, state)
    trained = [load_autoencoder(reference)] + [load_autoencoder(f) for f in autoencoders]
    if ddas["untrained_slots"] == "score":
        input_dim = trained[0].encoder[0].in_features
        trained += [initial_autoencoder(input_dim, ddas["hidden"], _slot_seed(exp, seed, slot))
                    for slot in range(len(trained), model["experts"]["routers"] + 1)]
    return DDASModel(moe, extractor(ddas, extractor_weights), trained, ddas["threshold"], ddas["batchwise"],
                     ddas["image_size"]).eval()


def _slot_seed(exp: str, seed: int, slot: int) -> int:
    """The seed of DDAS slot ``slot``'s initial weights (0: the reference autoencoder, t + 1: task t's)."""
    return derive_seed(exp, seed, slot, "autoencoder")


def _run_files(run: str | Path, t: int) -> dict:
    return {"state": str(layout.in_run(run, t, layout.STATE)),
            "autoencoders": [str(layout.in_run(run, s, layout.AUTOENCODER)) for s in range(t + 1)],
            "reference": str(layout.in_run(run, 0, layout.REFERENCE_AUTOENCODER))}


def _extractor_file(spec: dict, root: str | Path) -> str | None:
    from ..registry import method_of

    files = method_of(spec).weights(spec)
    return str(Path(root) / files[0]) if files else None


def model_after_task(experiment: dict, backbone: dict, weights: str | Path, run: str | Path, t: int) -> DDASModel:
    """The MoE-Adapters model after task ``t`` of a run folder, with DDAS, from its per-task files (eval mode,
    CPU)."""
    from ..registry import model_settings

    exp, seed = layout.run_identity(run)
    return ddas_model(exp, seed, t, model_settings(experiment), experiment["ddas"], backbone, str(weights),
                      extractor_weights=_extractor_file(experiment, layout.run_root(run)), **_run_files(run, t))


# ---- training ----

@dataclass(frozen=True)
class Train:
    """Rule train_moe: task t of the sequence."""

    exp: str
    seed: int
    t: int
    model: dict  # method, backbone, experts
    train: dict  # lr (one per dataset), iterations, warmup, batch_size, weight_decay, label_smoothing, transform, ...
    dataset: dict  # the prompt template
    backbone: dict
    weights: str
    manifest: str
    out: str
    log_csv: str
    previous: str | None = None  # t >= 1: the previous task's state
    decoded: str | None = None
    loader_workers: int = 0
    threads: int = 1


def train(step: Train) -> None:
    """Train task t's router and the experts not frozen on dataset t; write the task's state (experts, routers
    0..t, the experts frozen after it: those before plus the ``train.freeze`` most chosen of every block and tower
    in this task) and its log (one row per pass over the dataset)."""
    device = start(step.threads)
    cfg = step.train
    seed_everything(derive_seed(step.exp, step.seed, step.t, "moe"))
    moe = moe_model(step.model, step.backbone, step.weights)
    frozen = load_moe_state(moe, step.previous) if step.previous else {}
    moe.to(device)
    moe.set_generator(torch.Generator(device=device).manual_seed(derive_seed(step.exp, step.seed, step.t, "routing")))
    tokens = _prompt_tokens(step.manifest, step.dataset, moe.clip).to(device)
    loader = _batches(step.manifest, step.backbone, cfg["batch_size"], device, shuffle=True,
                      seed=derive_seed(step.exp, step.seed, step.t, "data"), decoded=step.decoded,
                      workers=step.loader_workers, transform=cfg["transform"], crop_scale=tuple(cfg["crop_scale"]))
    recipe = Recipe(lr=cfg["lr"][step.t], iterations=cfg["iterations"], warmup=cfg["warmup"],
                    weight_decay=cfg["weight_decay"], label_smoothing=cfg["label_smoothing"],
                    balance_loss=cfg["balance_loss"])
    trainable = moe.parameter_count(1, frozen)
    log = PassLog(f"task {step.t}", len(loader), cfg["iterations"] + 1)
    print(f"task {step.t}: {len(loader.dataset)} images, {len(loader)} batches a pass, {cfg['iterations'] + 1} steps, "
          f"lr {recipe.lr:g}, {trainable} trainable parameters "
          f"({sum(len(v) for v in frozen.values())} experts frozen)")
    train_task(moe, step.t, lambda: iter(loader), tokens, recipe, frozen, log)
    counts = moe.selection_counts()
    after = update_frozen(frozen, counts, cfg["freeze"]) if cfg["freeze"] else frozen
    write_csv(step.log_csv, log.rows)
    save_state(step.out, moe_state(moe, step.t, after),
               {"kind": "moe_adapters", "task": step.t, "trainable_parameters": trainable,
                "frozen_before": sum(len(v) for v in frozen.values()),
                "frozen_after": sum(len(v) for v in after.values()),
                "selection_counts": {name: c.tolist() for name, c in counts.items()},
                "backbone_sha256": file_sha256(step.weights)})


@dataclass(frozen=True)
class TrainAutoencoder:
    """Rules train_autoencoder (task t's, slot t + 1) and train_reference_autoencoder (slot 0)."""

    exp: str
    seed: int
    slot: int
    ddas: dict  # the autoencoders' keys of the experiment's ddas (ifcl.catalog.moe_adapters.AUTOENCODER_KEYS)
    images: dict  # the training images' transform and crop_scale (train.transform, train.crop_scale)
    backbone: dict
    manifest: str
    out: str
    extractor_weights: str | None = None
    decoded: str | None = None
    loader_workers: int = 0
    threads: int = 1


def train_autoencoder(step: TrainAutoencoder) -> None:
    """A DDAS slot's autoencoder: from its seeded initial weights (the same that the evaluations score while the
    slot is not trained), ``reference_iterations`` (slot 0) or ``iterations`` + 1 Adam steps on the extractor's
    inputs of shuffled training batches (:func:`ifcl.methods.moe_adapters.train_autoencoder`)."""
    device = start(step.threads)
    cfg = step.ddas
    seed_everything(derive_seed(step.exp, step.seed, step.slot, "autoencoder-training"))
    fe = extractor(cfg, step.extractor_weights).to(device)
    loader = _batches(step.manifest, step.backbone, cfg["batch_size"], device, shuffle=True,
                      seed=derive_seed(step.exp, step.seed, step.slot, "autoencoder-data"), decoded=step.decoded,
                      workers=step.loader_workers, transform=step.images["transform"],
                      crop_scale=tuple(step.images["crop_scale"]))
    size = cfg["image_size"] or step.backbone["image_size"]
    with torch.no_grad():
        input_dim = extractor_inputs(fe, torch.zeros(1, 3, size, size, device=device), cfg["image_size"]).shape[1]
    ae = initial_autoencoder(input_dim, cfg["hidden"], _slot_seed(step.exp, step.seed, step.slot)).to(device)
    iterations = cfg["reference_iterations"] if step.slot == 0 else cfg["iterations"]
    losses = []
    print(f"DDAS slot {step.slot}: {len(loader.dataset)} images, {len(loader)} batches a pass, {iterations + 1} "
          f"steps, input {input_dim}, code {cfg['hidden']}")
    train_slot(ae, lambda: (extractor_inputs(fe, x, cfg["image_size"]) for x, _ in loader), iterations, len(loader),
               cfg["lr"], cfg["lr_decay"], cfg["lr_decay_epochs"], cfg["weight_decay"],
               lambda n, loss, lr: losses.append(loss))
    print(f"reconstruction loss {losses[0]:.5f} -> {losses[-1]:.5f}")
    save_state(step.out, {k: v.detach().cpu() for k, v in ae.state_dict().items()},
               {"kind": "ddas_autoencoder", "slot": step.slot, "input_dim": input_dim, "hidden": cfg["hidden"],
                "extractor": cfg["extractor"], "iterations": iterations, "images": len(loader.dataset),
                "loss_first": losses[0], "loss_last": losses[-1],
                "loss_last_pass": sum(losses[-len(loader):]) / len(losses[-len(loader):])})


# ---- evaluation ----

@dataclass(frozen=True)
class Evaluate:
    """Rule evaluate_moe: every dataset of the sequence after task t (a row of the accuracy matrix)."""

    exp: str
    seed: int
    t: int
    model: dict  # method, backbone, experts
    ddas: dict
    eval_batch_size: int
    datasets: list  # the prompt template of every dataset of the sequence
    backbone: dict
    weights: str
    state: str
    autoencoders: list[str]  # tasks 0..t
    reference: str  # the reference autoencoder
    tests: list[str]
    out: str
    extractor_weights: str | None = None
    decoded: list[str] | None = None
    loader_workers: int = 0
    threads: int = 1


@torch.no_grad()
def evaluate(step: Evaluate) -> None:
    """Accuracy on every dataset of the sequence (seen and unseen) of the model after task t: batches of
    ``eval_batch_size`` consecutive test images, each sent by DDAS through a task's router or the frozen CLIP and
    classified against the dataset's class prompts through the same router (:meth:`DDASModel.logits`). eval.json
    also holds, per dataset, how many images went to the frozen CLIP and to each router slot (``ddas_choices``:
    [frozen CLIP, task 0, …])."""
    device = start(step.threads)
    model = ddas_model(step.exp, step.seed, step.t, step.model, step.ddas, step.backbone, step.weights, step.state,
                       step.autoencoders, step.reference, step.extractor_weights).to(device)
    slots = step.model["experts"]["routers"] + 1
    accs, choices = [], []
    for spec, test_csv, cache in zip(step.datasets, step.tests, step.decoded or [None] * len(step.tests)):
        tokens = _prompt_tokens(test_csv, spec, model.moe.clip).to(device)
        texts: dict[int, torch.Tensor] = {}

        def text(task: int) -> torch.Tensor:
            if task not in texts:
                texts[task] = model.moe.encode_text(tokens, task)
            return texts[task]

        correct = total = 0
        counts = torch.zeros(slots, dtype=torch.long)
        for x, y in _batches(test_csv, step.backbone, step.eval_batch_size, device, decoded=cache,
                             workers=step.loader_workers):
            logits, tasks = model.logits(x, text)
            correct += int((logits.argmax(1).cpu() == y).sum())
            total += len(y)
            counts += torch.bincount(tasks.cpu() + 1, minlength=slots)
        accs.append(100.0 * correct / total)
        choices.append(counts.tolist())
    print(f"after task {step.t}: accuracy per dataset {[round(a, 2) for a in accs]}; images per choice "
          f"(frozen CLIP, task 0, ...) {choices}")
    write_json(step.out, {"task": step.t, "accuracy": accs, "ddas_choices": choices})


def evaluate_run(config: dict, spec: dict, model: dict, run: str | Path, task: int, manifest: str | None,
                 tmp: str) -> None:
    """Rule evaluate_moe's step on a run folder's files (``ifcl run evaluate``): on the sequence's test sets, or on
    ``manifest`` (with the template of the sequence's dataset of the same classes, else the default)."""
    backbone = config["backbones"][spec["backbone"]]
    tests, prompts = evaluation_sets(config, spec, manifest)
    exp, seed = layout.run_identity(run)
    evaluate(Evaluate(exp=exp, seed=seed, t=task, model=model, ddas=spec["ddas"],
                      eval_batch_size=spec["eval_batch_size"], datasets=prompts, backbone=backbone,
                      weights=backbone_weights_file(spec["backbone"], backbone), tests=tests,
                      extractor_weights=_extractor_file(spec, "."), out=f"{tmp}/{layout.EVAL}",
                      **_run_files(run, task)))


@torch.no_grad()
def predictions(config: dict, spec: dict, model: DDASModel, loader, device, dataset: str | None = None) -> list[dict]:
    """``ifcl run predict``: per image the class among those of ``dataset`` (one of the sequence), or of every
    dataset of the sequence when None, through the router DDAS picks for its batch (or the frozen CLIP), and its
    softmax score (over CLIP's logits)."""
    sequence = spec["sequence"] if dataset is None else [dataset]
    if dataset is not None and dataset not in spec["sequence"]:
        raise KeyError(f"dataset {dataset!r} is not in the sequence ({', '.join(spec['sequence'])})")
    manifests = [layout.manifest_file(ds, "test") for ds in sequence]
    names = [n for m in manifests for n in class_names_of(read_manifest(m))]
    tokens = [_prompt_tokens(m, config["datasets"][ds], model.moe.clip).to(device) for m, ds in zip(manifests, sequence)]
    texts: dict[int, torch.Tensor] = {}

    def text(task: int) -> torch.Tensor:
        if task not in texts:
            texts[task] = torch.cat([model.moe.encode_text(t, task) for t in tokens])
        return texts[task]

    scale = float(model.moe.logit_scale())
    rows = []
    for x, index in loader:
        logits, _ = model.logits(x, text)
        score, pred = (scale * logits.float()).softmax(1).cpu().max(1)
        rows += [{"image": int(i), "predicted_class": names[int(c)], "score": float(s)}
                 for i, c, s in zip(index, pred, score)]
    return rows
