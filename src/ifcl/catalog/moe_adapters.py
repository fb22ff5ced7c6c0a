"""MoE-Adapters (Yu et al., CVPR 2024; ``JiazuoYu/MoE-Adapters4CL``, folder ``mtil``): a frozen CLIP whose every
residual block, in both towers, gets a mixture of expert adapters shared by all tasks and one router per task;
after each task the experts its router chose most are frozen for the later tasks; at test time per-task
autoencoders on AlexNet features (DDAS) pick, per test batch, the task whose router serves it, or the frozen CLIP.
Implementation: :mod:`ifcl.steps.moe_adapters` (its rule chain ``moe``: train_moe (from the previous task's
experts and routers), train_autoencoder, train_reference_autoencoder -> evaluate_moe), math in
:mod:`ifcl.methods.moe_adapters`, the model in :mod:`ifcl.models.clip_moe`.

The defaults are the official full-shot settings. Where ifcl differs (docs/methods.md has the list): the DIKI
configs' datasets and one prompt template (the official evaluation averages every template of ZSCL's datasets); the
test images in manifest order, so DDAS's batches hold other images; ifcl's per-task seeds instead of one seed 42 per
process; one GPU instead of DataParallel over two; the frozen set kept in each task's state (the official
frozen-list file is appended to and never cleared); the visual tower frozen by its own counts (the repository's
HEAD; before 2024-07-18 it used the text tower's); ``experts.bottleneck`` honoured (the official Adapter hard-codes
64). The options marked "not official" below exist for the tiny tests or as ablations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .. import layout
from ..config import ConfigError
from ..registry import Method
from ..settings import properties, setting

# DDAS's feature extractors: torchvision's AlexNet with its ImageNet weights (official; the weights file fetched into
# data/weights/ by rule fetch_torchvision_weights), or the same architecture with seeded random weights (no download:
# the tiny tests and the demo).
EXTRACTOR_WEIGHTS = {"alexnet-imagenet": "torchvision.alexnet.imagenet1k_v1"}
# the keys of `ddas` that the autoencoders' training reads (the others only the evaluation)
AUTOENCODER_KEYS = ("extractor", "image_size", "hidden", "reference", "reference_iterations", "iterations",
                    "batch_size", "lr", "lr_decay", "lr_decay_epochs", "weight_decay")


@dataclass(frozen=True, kw_only=True)
class Experts:
    """The mixture beside the MLP of every residual block of both CLIP towers (official: 22 experts, top-2,
    bottleneck 64, 11 router slots; each expert 0.1 · up(dropout_0.1(ReLU(down(x)))), as the official Adapter)"""

    count: int = setting(22, "expert adapters per block, shared by every task (official --experts_num 22)",
                         minimum=1)
    top_k: int = setting(2, "experts each image or prompt is routed to, by its block's first token (official "
                            "--topk, default 2)", minimum=1)
    bottleneck: int = setting(64, "width of each expert's down-projection (official 64: --ffn_num 64, which the "
                                  "official Adapter hard-codes)", minimum=1)
    routers: int = setting(11, "router slots per block, one per task, at least the sequence's length (official 11, "
                               "range(11)); DDAS scores one autoencoder slot more (the reference one)", minimum=1)


@dataclass(frozen=True, kw_only=True)
class Train:
    """AdamW (β 0.9, 0.999) over the task's router and every expert not frozen, the learning rate set before each
    of the iterations + 1 steps: a linear warm-up, then a cosine to 0; label-smoothed cross-entropy of the batch's
    images against the dataset's class prompts, both through the task's router with routing noise and dropout
    (official: 1000 iterations of batch 64, warm-up 100, smoothing 0.2, weight decay 0)"""

    lr: list[float] = setting(doc="one per dataset of the sequence, in its order (official, order I: 5e-3, 1e-3, "
                                  "5e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-3)", items_minimum=0,
                              min_items=1)
    iterations: int = setting(1000, minimum=1)
    warmup: int = setting(100, minimum=0)
    batch_size: int = setting(64, minimum=1)
    weight_decay: float = setting(0.0, minimum=0)
    label_smoothing: float = setting(0.2, minimum=0, maximum=1)
    transform: Literal["clip-train", "clip"] = setting(
        "clip-train", "the training images' transform, for the mixture and the autoencoders alike: clip-train, the "
                      "official bicubic RandomResizedCrop of scale crop_scale without flip (read from the image "
                      "files); clip, CLIP's test preprocessing (resize, centre crop)")
    crop_scale: list[float] = setting([0.9, 1.0], "clip-train's area range (official 0.9-1)", items_minimum=0,
                                      min_items=2, max_items=2)
    balance_loss: bool = setting(False, "add the load-balancing loss of every block, 0.01 · (cv²(importance) + "
                                        "cv²(load)), to the cross-entropy (official: false; the official block "
                                        "computes it and drops it)")
    freeze: int = setting(2, "after each task the this-many experts of every block and tower that its router "
                             "chose most are frozen for every later task (official 2, torch.topk(map, 2); 0: none)",
                          minimum=0)


@dataclass(frozen=True, kw_only=True)
class DDAS:
    """The Distribution Discriminative Auto-Selector: one autoencoder per task and a reference one, on
    sigmoid(conv5) of a frozen AlexNet (Linear(F, hidden) → ReLU → Linear(hidden, F) → Sigmoid, MSE); Adam with
    weight decay at lr · lr_decay^(epoch // lr_decay_epochs). At test time the smallest reconstruction error
    picks the task whose router serves the images, the reference autoencoder or an error above the threshold the
    frozen CLIP (official: AlexNet with ImageNet weights, hidden 100, TinyImageNet 1000 iterations then 300 per
    task, batch 64, lr 0.01, threshold 0.0655, per test batch)"""

    extractor: Literal["alexnet-imagenet", "alexnet-random"] = setting(
        "alexnet-imagenet", "alexnet-imagenet: torchvision's AlexNet with its ImageNet weights (official; fetched "
                            "into data/weights/ by rule fetch_torchvision_weights); alexnet-random: the same "
                            "architecture with random weights drawn from seed 0, for runs without the download "
                            "(the tiny tests); not the official selector")
    image_size: int | None = setting(
        None, "the extractor's input size: null, the images as CLIP preprocesses them (official: 224 px at "
              "ViT-B/16); n: resized (bilinear) to n × n first, for backbones whose images are smaller than "
              "AlexNet's 63-px minimum (the tiny tests; not official)", minimum=63)
    hidden: int = setting(100, "the autoencoders' code width (official 100)", minimum=1)
    reference: str = setting(doc="a configured dataset whose training images train the reference autoencoder, "
                                 "the zero-shot slot (official: TinyImageNet, config/mtil.yaml's tinyimagenet)")
    reference_iterations: int = setting(1000, "the reference autoencoder's iterations (official 1000; "
                                              "iterations + 1 steps)", minimum=1)
    iterations: int = setting(300, "each task's autoencoder's iterations (official 300; iterations + 1 steps)",
                              minimum=1)
    batch_size: int = setting(64, minimum=1)
    lr: float = setting(0.01, "the learning rate before decay (official 0.01: exp_lr_scheduler's init_lr, which "
                              "overrides Adam's lr=0.003 at every step; few-shot 0.003)", exclusive_minimum=0)
    lr_decay: float = setting(0.1, "factor every lr_decay_epochs passes over the dataset (official 0.1)",
                              exclusive_minimum=0, maximum=1)
    lr_decay_epochs: int = setting(10, "(official 10)", minimum=1)
    weight_decay: float = setting(1e-4, "Adam's (an L2 term, not decoupled; official 1e-4)", minimum=0)
    threshold: float = setting(0.0655, "a smallest reconstruction error above it sends the images to the frozen "
                                       "CLIP (official 0.0655, set by hand; few-shot 0.06)", exclusive_minimum=0)
    batchwise: bool = setting(True, "true: one choice per test batch of eval_batch_size images, from the batch's "
                                    "mean squared error (official; the result depends on the batches); false: one "
                                    "per image (not official)")
    untrained_slots: Literal["score", "skip"] = setting(
        "score", "score: the autoencoder slots of the tasks not yet trained take part in the choice with their "
                 "initial random weights (official: all 12 slots of the chooser file); skip: only the trained ones")


@dataclass(frozen=True, kw_only=True)
class MoEAdapters:
    experts: Experts = setting(Experts())
    train: Train = setting()
    ddas: DDAS = setting()


def reference_datasets(spec: dict) -> tuple[str, ...]:
    return (spec["ddas"]["reference"],)


def extractor_weights(spec: dict) -> tuple[str, ...]:
    """The file under data/weights/ that DDAS's extractor reads (none for alexnet-random)."""
    name = EXTRACTOR_WEIGHTS.get(spec["ddas"]["extractor"])
    return (layout.FETCHED.format(model=name),) if name else ()


def _filled(cls, value: dict | None) -> dict:
    """A settings mapping with the defaults of the keys it leaves out (``check`` may see a config before the
    schema's defaults are filled in)."""
    defaults = {name: p["default"] for name, p in properties(cls).items() if "default" in p}
    return {**defaults, **(value or {})}


def check(key: str, spec: dict, config: dict) -> None:
    experts, train, ddas = (_filled(Experts, spec.get("experts")), _filled(Train, spec["train"]),
                            _filled(DDAS, spec["ddas"]))
    if len(train["lr"]) != len(spec["sequence"]):
        raise ConfigError(f"{key}.train.lr: {len(train['lr'])} learning rates for a sequence of "
                          f"{len(spec['sequence'])} datasets (one per dataset, in its order)")
    low, high = train["crop_scale"]
    if not 0 < low <= high <= 1:
        raise ConfigError(f"{key}.train.crop_scale: {train['crop_scale']} is not an area range 0 < low <= high <= 1")
    if train["warmup"] >= train["iterations"]:
        raise ConfigError(f"{key}.train.warmup: {train['warmup']} steps, not fewer than the "
                          f"{train['iterations']} iterations")
    if experts["top_k"] > experts["count"]:
        raise ConfigError(f"{key}.experts.top_k: {experts['top_k']} of {experts['count']} experts")
    if train["freeze"] > experts["count"]:
        raise ConfigError(f"{key}.train.freeze: {train['freeze']} of {experts['count']} experts")
    if experts["routers"] < len(spec["sequence"]):
        raise ConfigError(f"{key}.experts.routers: {experts['routers']} router slots for a sequence of "
                          f"{len(spec['sequence'])} datasets (one per task)")
    reference = ddas["reference"]
    if reference not in config["datasets"]:
        raise ConfigError(f"{key}.ddas.reference: unknown dataset '{reference}' (defined: "
                          f"{', '.join(sorted(config['datasets']))})")
    if config["datasets"][reference]["type"] == "captions":
        raise ConfigError(f"{key}.ddas.reference: '{reference}' is a captions dataset (no images)")
    size = ddas["image_size"] or config["backbones"][spec["backbone"]]["image_size"]
    if size < 63:
        raise ConfigError(f"{key}.ddas.image_size: AlexNet needs images of at least 63 px, and the images of "
                          f"'{spec['backbone']}' have {size}: set ddas.image_size")


def task_files(spec: dict, t: int) -> tuple[str, ...]:
    """Task t's experts and routers (with the frozen set), its DDAS autoencoder, its log and evaluation; task 0
    also the reference autoencoder (trained once per run)."""
    return (layout.STATE, layout.AUTOENCODER, *((layout.REFERENCE_AUTOENCODER,) if t == 0 else ()),
            layout.TRAIN_LOG, layout.EVAL)


_SOURCE = "JiazuoYu/MoE-Adapters4CL mtil/clip/model.py, mtil/src/models/finetune.py, AutoEncoder.py, evaluation.py"

METHODS = (Method(
    name="moe-adapters", protocol="mtil", chain="moe", title="MoE-Adapters",
    description="one task per dataset of `sequence`, on a frozen CLIP: a mixture of expert adapters beside every "
                "MLP of both towers, shared by the tasks, one router per task, the experts a task chose most "
                "frozen for the later ones; per-task autoencoders on AlexNet features (DDAS) send each test batch "
                f"to its task's router or to the frozen CLIP ({_SOURCE})",
    steps="ifcl.steps.moe_adapters", settings=MoEAdapters, model_keys=("experts",), task_files=task_files,
    check=check, reference_datasets=reference_datasets, weights_read=extractor_weights,
    log_fields={"accuracy": "train_accuracy"}),)
