"""Loading images listed in a manifest, with the official transform recipes (liangyanshuo/InfLoRA, defined in
:mod:`ifcl.data.transforms`), from the image files or from a decoded-image cache (:mod:`ifcl.data.decoded`)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .decoded import DecodedDataset, batch_preparation
from .manifest import read_manifest, selected_rows
from .transforms import make_transform, read_image


class ImageList(Dataset):
    """Image files with their targets, decoded and transformed."""

    def __init__(self, items: list[tuple[str, int]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, target = self.items[i]
        return self.transform(read_image(path)), target


class ManifestDataset(ImageList):
    """Images of the manifest whose label is in ``classes``, decoded from their files and transformed."""

    def __init__(self, manifest: str, classes: Sequence[int], class_order: Sequence[int], transform):
        rows = read_manifest(manifest)
        super().__init__([(rows[i][0], target) for i, target in selected_rows(rows, classes, class_order, manifest)],
                         transform)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0,
                pin_memory: bool = False, drop_last: bool = False) -> DataLoader:
    """A DataLoader whose shuffling is driven by its own seeded generator (reproducible on CPU); ``drop_last``:
    without the last partial batch (the prompt methods' official training loader)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=num_workers,
                      persistent_workers=False, drop_last=drop_last, pin_memory=pin_memory)


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
                  crop_scale: Sequence[float] = (0.08, 1.0), decoded: str | None = None,
                  workers: int = 0, drop_last: bool = False) -> DeviceBatches:
    """Batches of the manifest's images of ``classes`` under ``transform`` at ``image['image_size']``, normalised
    with ``image['mean']`` / ``image['std']``, on ``device``; shuffled by a generator seeded with ``seed``.

    ``decoded``: the manifest's decoded-image cache (:func:`ifcl.data.transforms.decoded_file` names it):
    the images are read from it instead of their files, and made model inputs on the device.

    ``workers``: DataLoader worker processes decoding the images (0: in the job's process). Random augmentations
    then come from per-worker random streams, so a result depends on the number of workers; it is an experiment
    setting (``loader_workers``). ``drop_last``: without the last partial batch."""
    device = torch.device(device)
    size, mean, std = image["image_size"], image["mean"], image["std"]
    pin = device.type == "cuda"
    if decoded is None:
        dataset = ManifestDataset(manifest, classes, class_order, make_transform(transform, size, mean, std, crop_scale))
        loader = make_loader(dataset, batch_size, shuffle, seed, workers, pin_memory=pin, drop_last=drop_last)
        return DeviceBatches(loader, device, lambda x: x)
    dataset = DecodedDataset(decoded, manifest, classes, class_order, size)
    print(f"{len(dataset)} images from the decoded-image cache {decoded}", flush=True)
    prepare = batch_preparation(transform, mean, std, crop_scale, seed, device)
    loader = make_loader(dataset, batch_size, shuffle, seed, workers, pin_memory=pin, drop_last=drop_last)
    return DeviceBatches(loader, device, prepare)
