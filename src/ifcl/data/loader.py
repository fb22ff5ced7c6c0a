"""Loading images listed in a manifest, with the official transform recipes (reference/inflora.md §4.3), from the
image files or from a decoded-image cache (:mod:`ifcl.data.decoded`)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .manifest import DatasetError, read_manifest


def geometric_ops(name: str, size: int, crop_scale: Sequence[float] = (0.08, 1.0)) -> list:
    """The PIL resizing and cropping of a transform (everything before ``ToTensor``)."""
    if name == "random-resized-crop-flip":
        return [T.RandomResizedCrop(size, scale=tuple(crop_scale)), T.RandomHorizontalFlip()]
    if name == "resize":
        return [T.Resize((size, size))]
    if name == "resize-center-crop":
        return [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)]
    if name == "clip":  # CLIP's own preprocessing (reference/diki.md §1): bicubic shorter side, centre crop
        return [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    raise ValueError(f"unknown transform {name!r}")


def make_transform(name: str, size: int, mean: Sequence[float], std: Sequence[float],
                   crop_scale: Sequence[float] = (0.08, 1.0)):
    """``random-resized-crop-flip``: RandomResizedCrop(size, scale=crop_scale) (official: 0.08-1, bilinear) + flip;
    ``resize``: Resize to size x size; ``resize-center-crop``: Resize(size * 256 / 224) + CenterCrop(size);
    ``clip``: bicubic Resize(size) + CenterCrop(size), for training and testing alike (DIKI).
    Then ToTensor (pixels in [0, 1]) and Normalize(mean, std); the official InfLoRA code uses mean 0, std 1."""
    return T.Compose(geometric_ops(name, size, crop_scale) + [T.ToTensor(), T.Normalize(mean, std)])


def selected_rows(rows: list[tuple[str, int, str]], classes: Sequence[int], class_order: Sequence[int],
                  manifest: str) -> list[tuple[int, int]]:
    """(row index, target) of the manifest rows whose label is in ``classes``; the target is the label's position
    in ``class_order`` (the global class index used by the heads)."""
    keep = set(classes)
    position = {label: i for i, label in enumerate(class_order)}
    chosen = [(i, position[label]) for i, (_, label, _) in enumerate(rows) if label in keep]
    if not chosen:
        raise DatasetError(f"{manifest} has no images of classes {sorted(keep)}")
    return chosen


def read_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


class ManifestDataset(Dataset):
    """Images of the manifest whose label is in ``classes``, decoded from their files and transformed."""

    def __init__(self, manifest: str, classes: Sequence[int], class_order: Sequence[int], transform):
        rows = read_manifest(manifest)
        self.items = [(rows[i][0], target) for i, target in selected_rows(rows, classes, class_order, manifest)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, target = self.items[i]
        return self.transform(read_image(path)), target


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose shuffling is driven by its own seeded generator (reproducible on CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=num_workers,
                      persistent_workers=False, drop_last=False, pin_memory=pin_memory)


class DeviceBatches:
    """The batches of a loader moved to ``device`` and turned into model inputs there by ``prepare`` (identity for
    images transformed by PIL; conversion and augmentation of uint8 batches from a decoded-image cache)."""

    def __init__(self, loader: DataLoader, device: torch.device, prepare: Callable[[torch.Tensor], torch.Tensor]):
        self.loader, self.device, self.prepare = loader, torch.device(device), prepare
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield self.prepare(x.to(self.device, non_blocking=True)), y


def image_batches(manifest: str, classes: Sequence[int], class_order: Sequence[int], transform: str, image: dict,
                  batch_size: int, shuffle: bool, seed: int = 0, device: str | torch.device = "cpu",
                  crop_scale: Sequence[float] = (0.08, 1.0), decoded: str | None = None) -> DeviceBatches:
    """Batches of the manifest's images of ``classes`` under ``transform`` at ``image['image_size']``, normalised
    with ``image['mean']`` / ``image['std']``, on ``device``; shuffled by a generator seeded with ``seed``.

    ``decoded``: the manifest's decoded-image cache (:func:`ifcl.data.manifest.decoded_file` names it):
    the images are read from it instead of their files, and made model inputs on the device."""
    device = torch.device(device)
    size, mean, std = image["image_size"], image["mean"], image["std"]
    pin = device.type == "cuda"
    if decoded is None:
        dataset = ManifestDataset(manifest, classes, class_order, make_transform(transform, size, mean, std, crop_scale))
        return DeviceBatches(make_loader(dataset, batch_size, shuffle, seed, pin_memory=pin), device, lambda x: x)
    from .decoded import DecodedDataset, batch_preparation

    dataset = DecodedDataset(decoded, manifest, classes, class_order, size)
    print(f"{len(dataset)} images from the decoded-image cache {decoded}", flush=True)
    prepare = batch_preparation(transform, mean, std, crop_scale, seed, device)
    return DeviceBatches(make_loader(dataset, batch_size, shuffle, seed, pin_memory=pin), device, prepare)
