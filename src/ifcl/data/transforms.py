"""The image transforms (the official recipes, liangyanshuo/InfLoRA) and the naming of decoded-image caches.

A transform is named in the config (``train_transform``, ``test_transform``): :data:`TRANSFORMS` lists every name,
:data:`DETERMINISTIC` those without randomness, whose output a decoded-image cache (:mod:`ifcl.data.decoded`) can
store; :func:`decoded_file` says where the cache of a dataset split lives.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .manifest import DatasetError

if TYPE_CHECKING:
    from PIL import Image

# Pillow and torchvision are imported where an image is read or transformed, not with the module: the workflow
# imports the transform names and decoded_file when it starts (workflow/rules/common.smk), and torchvision alone
# would add seconds to every Snakemake start.

# Every transform name, the random training augmentation first.
TRANSFORMS = ("random-resized-crop-flip", "resize", "resize-center-crop", "clip")

# Transforms without randomness: a decoded-image cache (ifcl.data.decoded) can store their output.
DETERMINISTIC = ("resize", "resize-center-crop", "clip")


def geometric_ops(name: str, size: int, crop_scale: Sequence[float] = (0.08, 1.0)) -> list:
    """The PIL resizing and cropping of a transform (everything before ``ToTensor``)."""
    from torchvision import transforms as T

    if name == "random-resized-crop-flip":
        return [T.RandomResizedCrop(size, scale=tuple(crop_scale)), T.RandomHorizontalFlip()]
    if name == "resize":
        return [T.Resize((size, size))]
    if name == "resize-center-crop":
        return [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)]
    if name == "clip":  # CLIP's own preprocessing (lloongx/DIKI): bicubic shorter side, centre crop
        return [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    raise ValueError(f"unknown transform {name!r}")


def make_transform(name: str, size: int, mean: Sequence[float], std: Sequence[float],
                   crop_scale: Sequence[float] = (0.08, 1.0)):
    """``random-resized-crop-flip``: RandomResizedCrop(size, scale=crop_scale) (official: 0.08-1, bilinear) + flip;
    ``resize``: Resize to size x size; ``resize-center-crop``: Resize(size * 256 / 224) + CenterCrop(size);
    ``clip``: bicubic Resize(size) + CenterCrop(size), for training and testing alike (DIKI).
    Then ToTensor (pixels in [0, 1]) and Normalize(mean, std); the official InfLoRA code uses mean 0, std 1."""
    from torchvision import transforms as T

    return T.Compose(geometric_ops(name, size, crop_scale) + [T.ToTensor(), T.Normalize(mean, std)])


def read_image(path: str) -> Image.Image:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def cache_transform(transform: str) -> str:
    """The deterministic transform a decoded-image cache for ``transform`` stores (random crops are taken from
    ``resize``, on the device)."""
    if transform == "random-resized-crop-flip":
        return "resize"
    if transform not in DETERMINISTIC:
        raise ValueError(f"unknown transform {transform!r}")
    return transform


def decoded_file(dataset: str, split: str, transform: str, size: int) -> str:
    """Where the decoded-image cache of a dataset split read under ``transform`` at ``size`` px lives."""
    return f"data/decoded/{dataset}/{split}-{cache_transform(transform)}-{size}.npy"
