"""The MTIL methods that fine-tune the whole CLIP, as ZSCL's official code runs them (``Thunderbeee/ZSCL``
``mtil/src/models/finetune.py``, ``icarl.py`` and the shell scripts of its ``mtil`` folder): Continual-FT, WiSE-FT,
LwF, LwF-VR, iCaRL and ZSCL. Implementation: :mod:`ifcl.steps.zscl` (its rule chain ``finetune``: train_finetune ->
evaluate_finetune, each task starting from the previous task's weights), losses and loop in
:mod:`ifcl.methods.zscl`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .. import layout
from ..config import ConfigError
from ..registry import Method
from ..settings import setting


@dataclass(frozen=True, kw_only=True)
class Train:
    """AdamW (β₂ as given) over every CLIP weight but logit_scale, the learning rate set before each of the
    iterations + 1 steps: a linear warm-up, then a cosine to 0; label-smoothed cross-entropy over the dataset's class
    prompts (official: 1000 iterations of batch 64, warm-up 100, smoothing 0.2, weight decay 0)"""

    lr: list[float] = setting(doc="one per dataset of the sequence, in its order (official: 1e-5; 5e-5 for Aircraft "
                                  "and MNIST)", items_minimum=0, min_items=1)
    iterations: int = setting(1000, minimum=1)
    warmup: int = setting(100, minimum=0)
    batch_size: int = setting(64, minimum=1)
    weight_decay: float = setting(0.0, minimum=0)
    beta2: float = setting(0.999, exclusive_minimum=0, exclusive_maximum=1)
    label_smoothing: float = setting(0.2, minimum=0, maximum=1)
    transform: Literal["clip-train", "clip"] = setting(
        "clip-train", "the training images' transform: clip-train, the official bicubic RandomResizedCrop of scale "
                      "crop_scale without flip (read from the image files: a decoded-image cache is used for clip only); "
                      "clip, CLIP's test preprocessing (resize, centre crop)")
    crop_scale: list[float] = setting([0.9, 1.0], "clip-train's area range (official 0.9-1)", items_minimum=0,
                                      min_items=2, max_items=2)


@dataclass(frozen=True, kw_only=True)
class ContinualFT:
    train: Train = setting()


@dataclass(frozen=True, kw_only=True)
class WiSEFT:
    train: Train = setting()
    wise_alpha: float = setting(0.8, "the task's weights = α · fine-tuned + (1 − α) · the weights it started from "
                                "(official 0.8)", minimum=0, maximum=1)


@dataclass(frozen=True, kw_only=True)
class LwF:
    train: Train = setting()
    temperature: float = setting(2.0, "of the distillation (official 2)", exclusive_minimum=0)


@dataclass(frozen=True, kw_only=True)
class LwFVR:
    train: Train = setting()
    temperature: float = setting(2.0, "of the distillation (official 2)", exclusive_minimum=0)
    vocabulary_size: int = setting(1000, "random token sequences distilled on (official 1000)", minimum=1)
    vocabulary_length: int = setting(10, "tokens in each, between the start and end tokens (official 10)",
                                     minimum=1)


@dataclass(frozen=True, kw_only=True)
class ReferenceData:
    images: str = setting(doc="a configured dataset whose training images are distilled on, shuffled, a batch of "
                              "train.batch_size per step (official: ImageNet's training set)")
    texts: str = setting(doc="a configured captions dataset (official: Conceptual Captions' validation captions), "
                             "or an image dataset whose class prompts are the texts (the official --ref-sentences "
                             "<dataset>)")


@dataclass(frozen=True, kw_only=True)
class ZSCL:
    train: Train = setting()
    reference: ReferenceData = setting()
    temperature: float = setting(2.0, "of the distillation (official 2)", exclusive_minimum=0)
    l2: float = setting(1.0, "weight of Σ‖θ − θ₀‖² to the weights the task started from (official 1)", minimum=0)
    average_every: int = setting(100, "the task's result is the mean of its starting weights and of the weights "
                                      "after every this many steps (the weight ensemble; official 100)", minimum=1)


@dataclass(frozen=True, kw_only=True)
class ICaRL:
    train: Train = setting()
    temperature: float = setting(2.0, "of the distillation (official 2)", exclusive_minimum=0)
    memory_size: int = setting(10000, "exemplar images kept over all earlier datasets (official 10000)", minimum=1)
    candidates: int = setting(30000, "a dataset's exemplars are chosen among its first this many training images "
                                     "(official 30000)", minimum=1)
    herding_indices: Literal["official", "picked"] = setting(
        "official", "official: the images the official code keeps (after the first pick, the image at the pick's "
                    "position in the shortened feature array); picked: the images herding picked")


def reference_datasets(spec: dict) -> tuple[str, ...]:
    return (spec["reference"]["images"], spec["reference"]["texts"]) if "reference" in spec else ()


def check(key: str, spec: dict, config: dict) -> None:
    train = spec["train"]
    if len(train["lr"]) != len(spec["sequence"]):
        raise ConfigError(f"{key}.train.lr: {len(train['lr'])} learning rates for a sequence of "
                          f"{len(spec['sequence'])} datasets (one per dataset, in its order)")
    low, high = train.get("crop_scale", (0.9, 1.0))
    if not 0 < low <= high <= 1:
        raise ConfigError(f"{key}.train.crop_scale: {[low, high]} is not an area range 0 < low <= high <= 1")
    if train["warmup"] >= train["iterations"]:
        raise ConfigError(f"{key}.train.warmup: {train['warmup']} steps, not fewer than the "
                          f"{train['iterations']} iterations")
    backbone = config["backbones"][spec["backbone"]]
    context = backbone["arch"]["text"]["context_length"] if backbone["type"] == "pretrain_clip" else 77
    for part, name in (spec.get("reference") or {}).items():
        if name not in config["datasets"]:
            raise ConfigError(f"{key}.reference.{part}: unknown dataset '{name}' (defined: "
                              f"{', '.join(sorted(config['datasets']))})")
        if part == "images" and config["datasets"][name]["type"] == "captions":
            raise ConfigError(f"{key}.reference.images: '{name}' is a captions dataset (no images)")
    if spec.get("vocabulary_length", 0) + 2 > context:
        raise ConfigError(f"{key}.vocabulary_length: {spec['vocabulary_length']} tokens and the start and end "
                          f"tokens do not fit the text context of '{spec['backbone']}' ({context})")


def task_files(spec: dict, t: int) -> tuple[str, ...]:
    return layout.STATE, layout.TRAIN_LOG, layout.EVAL


def icarl_task_files(spec: dict, t: int) -> tuple[str, ...]:
    return layout.STATE, layout.MEMORY, layout.TRAIN_LOG, layout.EVAL


_SOURCE = "Thunderbeee/ZSCL mtil/src/models/finetune.py"
_ICARL = "Thunderbeee/ZSCL mtil/src/models/icarl.py, mtil/src/dynamic_dataset.py"
_COMMON = dict(protocol="mtil", chain="finetune", steps="ifcl.steps.zscl", task_files=task_files, check=check,
               group="zscl", log_fields={"accuracy": "train_accuracy"})

METHODS = (
    Method(name="continual-ft", title="Continual-FT", settings=ContinualFT,
           description="every CLIP weight fine-tuned on each dataset in turn, the text classifier from the dataset's "
                       f"class prompts ({_SOURCE})", **_COMMON),
    Method(name="wise-ft", title="WiSE-FT", settings=WiSEFT,
           description="Continual-FT whose weights after each task are interpolated with those the task started "
                       f"from ({_SOURCE}: --wise_merge)", **_COMMON),
    Method(name="lwf", title="LwF", settings=LwF,
           description="Continual-FT plus the distillation, in both directions, of the previous task's model on the "
                       f"task's own images and class prompts ({_SOURCE})", **_COMMON),
    Method(name="lwf-vr", title="LwF-VR", settings=LwFVR,
           description="LwF distilling on random token sequences instead of the class prompts (a virtual "
                       f"vocabulary; {_SOURCE}: --ref-sentences random)", **_COMMON),
    Method(name="icarl", title="iCaRL", settings=ICaRL,
           description="Continual-FT plus the distillation, in both directions, of the zero-shot CLIP on an exemplar "
                       "memory of the earlier datasets' images (chosen by herding) against the task's class prompts "
                       f"({_ICARL})", **{**_COMMON, "task_files": icarl_task_files}),
    Method(name="zscl", title="ZSCL", settings=ZSCL, reference_datasets=reference_datasets,
           description="Continual-FT plus the distillation, in both directions, of the zero-shot CLIP on reference "
                       "images and texts (ImageNet and Conceptual Captions), an L2 anchor to the task's starting "
                       f"weights and a weight ensemble over the task ({_SOURCE}, run by the repository's ZSCL.sh)", **_COMMON),
)
