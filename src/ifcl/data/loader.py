"""Loading images listed in a manifest, with the official transform recipes (reference/inflora.md §4.3)."""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .manifest import DatasetError, read_manifest


def make_transform(name: str, size: int, mean: Sequence[float], std: Sequence[float],
                   crop_scale: Sequence[float] = (0.08, 1.0)):
    """``random-resized-crop-flip``: RandomResizedCrop(size, scale=crop_scale) (official: 0.08-1, bilinear) + flip;
    ``resize``: Resize to size x size; ``resize-center-crop``: Resize(size * 256 / 224) + CenterCrop(size);
    ``clip``: bicubic Resize(size) + CenterCrop(size), for training and testing alike (DIKI).
    Then ToTensor (pixels in [0, 1]) and Normalize(mean, std); the official InfLoRA code uses mean 0, std 1."""
    if name == "random-resized-crop-flip":
        ops = [T.RandomResizedCrop(size, scale=tuple(crop_scale)), T.RandomHorizontalFlip()]
    elif name == "resize":
        ops = [T.Resize((size, size))]
    elif name == "resize-center-crop":
        ops = [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)]
    elif name == "clip":  # CLIP's own preprocessing (reference/diki.md §1): bicubic shorter side, centre crop
        ops = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    else:
        raise ValueError(f"unknown transform {name!r}")
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


class ManifestDataset(Dataset):
    """Images of the manifest whose label is in ``classes``; targets are positions in ``class_order``
    (the global class index used by the heads)."""

    def __init__(self, manifest: str, classes: Sequence[int], class_order: Sequence[int], transform):
        keep = set(classes)
        position = {label: i for i, label in enumerate(class_order)}
        self.items = [(p, position[label]) for p, label, _ in read_manifest(manifest) if label in keep]
        if not self.items:
            raise DatasetError(f"{manifest} has no images of classes {sorted(keep)}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, target = self.items[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise DatasetError(f"cannot read image {path}: {e}") from e
        return self.transform(img), target


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """A DataLoader whose shuffling is driven by its own seeded generator (reproducible on CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=num_workers,
                      persistent_workers=False, drop_last=False)
