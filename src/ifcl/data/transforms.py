"""The reading of image files (:func:`read_image`: every mode as 8-bit RGB, :func:`to_rgb`), the image transforms
(the official recipes, liangyanshuo/InfLoRA) and the naming of decoded-image caches.

A transform is named in the config (``train_transform``, ``test_transform``): :data:`TRANSFORMS` lists every name,
:data:`DETERMINISTIC` those without randomness, whose output a decoded-image cache (:mod:`ifcl.data.decoded`) can
store; :func:`decoded_file` says where the cache of a dataset split lives.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from .manifest import DatasetError

if TYPE_CHECKING:
    from PIL import Image

# Pillow and torchvision are imported where an image is read or transformed, not with the module: the workflow
# imports the transform names and decoded_file when it starts (workflow/rules/common.smk), and torchvision alone
# would add seconds to every Snakemake start.

# Every transform name, the random training augmentation first.
TRANSFORMS = ("random-resized-crop-flip", "resize", "resize-center-crop", "clip", "clip-train")

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
    if name == "clip-train":  # ZSCL's training transform (Thunderbeee/ZSCL mtil/clip/clip.py, _transform): no flip
        return [T.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC)]
    raise ValueError(f"unknown transform {name!r}")


def make_transform(name: str, size: int, mean: Sequence[float], std: Sequence[float],
                   crop_scale: Sequence[float] = (0.08, 1.0)):
    """``random-resized-crop-flip``: RandomResizedCrop(size, scale=crop_scale) (official: 0.08-1, bilinear) + flip;
    ``resize``: Resize to size x size; ``resize-center-crop``: Resize(size * 256 / 224) + CenterCrop(size);
    ``clip``: bicubic Resize(size) + CenterCrop(size), for training and testing alike (DIKI); ``clip-train``: a
    bicubic RandomResizedCrop(size, scale=crop_scale) without flip (ZSCL's training images, scale 0.9-1).
    Then ToTensor (pixels in [0, 1]) and Normalize(mean, std); the official InfLoRA code uses mean 0, std 1."""
    from torchvision import transforms as T

    return T.Compose(geometric_ops(name, size, crop_scale) + [T.ToTensor(), T.Normalize(mean, std)])


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, whatever its mode: what every reader of an image file uses.

    - 16-bit and 32-bit integer greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I``): clipped to 0..65535 and shifted
      right by 8 bits (value // 256, as Pillow itself reads 16-bit RGB and RGBA PNGs, which it opens as 8-bit
      ``RGB`` and ``RGBA``); ``convert("RGB")`` alone would clip them, most images coming out white.
    - 32-bit float greyscale (``F``): if no value exceeds 1.0 it is taken as 0..1 and multiplied by 255, else as
      0..255; then rounded and clipped to 0..255 (NaN is 0).
    - Every other mode Pillow converts: ``1``, ``L``, ``P`` (its palette colours), ``RGB``, ``CMYK``, ``YCbCr``,
      ``LAB``, ``HSV``; alpha (``LA``, ``PA``, ``RGBA``, the transparency of ``P``) is dropped: the stored colours are
      kept, not composited on any background. A mode Pillow cannot convert raises ``ValueError``.
    """
    from PIL import Image

    if image.mode == "F":
        a = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        a = np.clip(np.rint(a * 255 if not (a > 1).any() else a), 0, 255)
        image = Image.fromarray(a.astype(np.uint8))
    elif image.mode.startswith("I"):
        image = Image.fromarray((np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8))
    elif image.mode == "P":  # by RGBA: the same colours, without Pillow's warning about palette transparency
        image = image.convert("RGBA")
    return image.convert("RGB")


def read_image(path: str) -> Image.Image:
    """The image file at ``path`` as 8-bit RGB (:func:`to_rgb`); a :class:`DatasetError` naming it if it does not
    decode."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except (OSError, ValueError) as e:
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
