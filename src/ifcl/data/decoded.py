"""Decoded-image caches: every image of a manifest decoded once into a memory-mapped uint8 array, and the batch
steps that make model inputs of its rows on the device.

A cache ``data/decoded/<dataset>/<split>-<stored>-<size>.npy`` holds, for every manifest row in order, the image
after the PIL resize and crop of the transform ``stored`` (what ``ToTensor`` would receive), as uint8
[rows, size, size, 3] in NumPy's ``.npy`` format, read with ``np.load(mmap_mode="r")``.

- Deterministic transforms (``resize``, ``resize-center-crop``, ``clip``) are stored as themselves. The float batch
  ``(x / 255 - mean) / std`` made from the cache is bit for bit the tensor ``ToTensor`` and ``Normalize`` make from
  the image (the same operations in the same order), so results do not change; only the decoding is gone.
- ``random-resized-crop-flip`` (training) is stored under ``resize`` (size × size) and RandomResizedCrop and the
  horizontal flip run on whole batches on the device (:func:`random_resized_crop_flip`). This is a deviation from
  the official per-image PIL crop (experiment option ``image_cache: all``): the crop is taken from the stored
  square image with bilinear sampling, and its parameters come from the job's seeded generator.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..files import atomic_path
from ..progress import track
from .manifest import DatasetError, read_manifest, selected_rows
from .transforms import DETERMINISTIC, geometric_ops, read_image


def write_decoded(manifest: str, transform: str, size: int, out: str, threads: int = 1) -> None:
    """Decode every image of ``manifest`` under the deterministic ``transform`` at ``size`` into ``out`` (written
    atomically; images decoded by ``threads`` threads, written in manifest order)."""
    if transform not in DETERMINISTIC:
        raise ValueError(f"a decoded-image cache stores a deterministic transform {DETERMINISTIC}, not {transform!r}")
    rows = read_manifest(manifest)
    ops = T.Compose(geometric_ops(transform, size))
    shape = (len(rows), size, size, 3)

    def decode(row) -> bytes:
        img = np.asarray(ops(read_image(row[0])), dtype=np.uint8)
        if img.shape != shape[1:]:
            raise DatasetError(f"{row[0]}: {transform} gave an image of shape {img.shape}, expected {shape[1:]}")
        return img.tobytes()

    with atomic_path(out) as f, ThreadPoolExecutor(max(1, threads)) as pool:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        for data in track(pool.map(decode, rows), f"decode {Path(manifest).name}", total=len(rows), unit="images"):
            f.write(data)
    print(f"{len(rows)} images decoded under {transform} at {size} px into {out} "
          f"({np.prod(shape) / 2**20:.1f} MiB)", flush=True)


class DecodedDataset(Dataset):
    """The rows of a decoded-image cache whose label is in ``classes``: uint8 [size, size, 3] tensors and the
    label's position in ``class_order``."""

    def __init__(self, cache: str, manifest: str, classes: Sequence[int], class_order: Sequence[int], size: int):
        rows = read_manifest(manifest)
        self.images = np.load(cache, mmap_mode="r")
        if self.images.shape != (len(rows), size, size, 3) or self.images.dtype != np.uint8:
            raise DatasetError(f"{cache} holds {self.images.dtype} {self.images.shape}, expected uint8 "
                               f"{(len(rows), size, size, 3)} for {manifest}: delete it to decode it again")
        self.items = selected_rows(rows, classes, class_order, manifest)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        row, target = self.items[i]
        return torch.from_numpy(np.array(self.images[row])), target


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1], as ``ToTensor`` computes it (divided by 255), in the
    same (contiguous) memory layout: a channels-last batch would let the patch embedding pick another kernel, whose
    float rounding differs on some CPUs."""
    return x.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``Normalize(mean, std)`` on a batch (subtract, then divide, as torchvision does)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub(m).div(s)


def crop_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
               generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop's boxes (top, left, height, width) for ``n`` images, torchvision's sampling on a whole
    batch: up to 10 draws of area fraction and log aspect ratio per image, the first that fits, else the whole
    image clipped to the ratio range, centred; then a uniform position."""
    area = height * width * torch.empty(n, 10).uniform_(scale[0], scale[1], generator=generator)
    aspect = torch.exp(torch.empty(n, 10).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int64).argmax(1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    none_fit = ~fits.any(1)
    w, h = torch.where(none_fit, float(fw), w), torch.where(none_fit, float(fh), h)
    top = torch.floor(torch.rand(n, generator=generator) * (height - h + 1))
    left = torch.floor(torch.rand(n, generator=generator) * (width - w + 1))
    top = torch.where(none_fit, torch.div(height - h, 2, rounding_mode="floor"), top)
    left = torch.where(none_fit, torch.div(width - w, 2, rounding_mode="floor"), left)
    return torch.stack([top, left, h, w], dim=1)


def random_resized_crop_flip(x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Crop ``boxes`` (top, left, height, width) out of the float batch x [B, C, H, W], resize each to H × W with
    bilinear sampling (half-pixel centres, as ``interpolate(align_corners=False)`` on the cropped image), and
    mirror the images where ``flips``: one ``grid_sample`` over the batch."""
    b, c, height, width = x.shape
    top, left, h, w = (v.to(x.device, torch.float32) for v in boxes.unbind(1))
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = torch.where(flips.to(x.device), -w / width, w / width)
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [b, c, height, width], align_corners=False)
    # sample inside the box only (its edge pixels repeat outward), as resizing the cropped image does
    lo = torch.stack([(2 * left + 1) / width, (2 * top + 1) / height], dim=1) - 1
    hi = torch.stack([(2 * (left + w) - 1) / width, (2 * (top + h) - 1) / height], dim=1) - 1
    grid = torch.maximum(torch.minimum(grid, hi[:, None, None, :]), lo[:, None, None, :])
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def batch_preparation(transform: str, mean: Sequence[float], std: Sequence[float], crop_scale: Sequence[float],
                      seed: int, device: torch.device):
    """What turns a uint8 batch of a decoded-image cache into model inputs on ``device``: ToTensor + Normalize;
    for ``random-resized-crop-flip`` the crop and flip in between, drawn from a generator seeded with seed + 1."""
    if transform in DETERMINISTIC:
        return lambda x: normalize(to_unit_range(x), mean, std)
    if transform != "random-resized-crop-flip":
        raise ValueError(f"unknown transform {transform!r}")
    generator = torch.Generator().manual_seed(seed + 1)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = to_unit_range(x)
        boxes = crop_boxes(len(x), x.shape[2], x.shape[3], crop_scale, (3 / 4, 4 / 3), generator)
        flips = torch.rand(len(x), generator=generator) < 0.5
        return normalize(random_resized_crop_flip(x, boxes, flips), mean, std)
    return prepare
