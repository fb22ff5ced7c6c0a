"""Manifests of the paper benchmarks from their raw files (liangyanshuo/InfLoRA), never touching those files.

* ``cifar100``: the binary version's records are decoded (no pickle) and written once as lossless PNG files under
  ``data/prepared/<dataset>/images/``; labels are the fine labels.
* ``imagenet-r``: ``coda-prompt`` split = CODA-Prompt's fixed 24,000 / 6,000 lists; ``random`` split = the official
  code's ``random_split``: ``torch.manual_seed(seed)``, ``randperm`` over the ImageFolder order (sorted wnid
  folders, sorted files), the first ``int(0.8 N)`` for training, **without** moving any file. Labels follow the
  sorted wnids.
* ``domainnet``: CODA-Prompt's lists (paths ``data/DomainNet/<domain>/<class>/<file>``, targets 0-344).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from .manifest import DatasetError, IMAGE_SUFFIXES
from .captions import sources_of as caption_sources

Rows = list[tuple[str, int, str]]


CIFAR_RECORD = 2 + 3 * 32 * 32  # coarse label, fine label, then the R, G and B planes of a 32x32 image


def _read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Fine labels [n] and images [n, 32, 32, 3] (uint8) of a CIFAR-100 binary-version file."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"{path} is missing: expected the extracted CIFAR-100 binary version") from None
    if data.size == 0 or data.size % CIFAR_RECORD:
        raise DatasetError(f"{path}: {data.size} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-100 records")
    records = data.reshape(-1, CIFAR_RECORD)
    return records[:, 1], records[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def cifar100_manifests(raw: str | Path, images_dir: str | Path) -> dict[str, Rows]:
    """Decode CIFAR-100's binary version (``raw/cifar-100-binary/{train,test}.bin``, ``fine_label_names.txt``)
    into PNG files and list them: the dataset the official code reads through torchvision's python version, but
    stored as plain records, so no pickle is ever loaded."""
    from PIL import Image

    base = Path(raw) / "cifar-100-binary"
    try:
        names = [n.strip() for n in (base / "fine_label_names.txt").read_text().splitlines() if n.strip()]
    except FileNotFoundError:
        raise DatasetError(f"{base / 'fine_label_names.txt'} is missing: expected the extracted CIFAR-100 binary version") from None
    out = {}
    for part in ("train", "test"):
        labels, pixels = _read_cifar_bin(base / f"{part}.bin")
        rows = []
        for i, (img, label) in enumerate(zip(pixels, labels.tolist())):
            path = Path(images_dir) / part / f"{label:03d}" / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path, optimize=False)
            rows.append((str(path), label, names[label]))
        out[part] = sorted(rows)
    return out


def _read_split_list(path: Path) -> tuple[list[str], list[int]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open(path) as f:
            doc = yaml.load(f, Loader=loader)
    except FileNotFoundError:
        raise DatasetError(f"split list {path} is missing") from None
    if not isinstance(doc, dict) or len(doc.get("data", ())) != len(doc.get("targets", ())) or not doc["data"]:
        raise DatasetError(f"{path}: expected keys 'data' (image paths) and 'targets' (labels) of equal length")
    return [str(p) for p in doc["data"]], [int(t) for t in doc["targets"]]


def _rows_from_list(paths: list[str], targets: list[int], strip: int, root: Path, listed_in: Path) -> Rows:
    """Rows for the listed images: the first ``strip`` path components (e.g. ``data/imagenet-r``) are replaced by
    ``root``; the class name is the folder holding the image; every listed file must exist."""
    rows, missing, names = [], [], {}
    for p, label in zip(paths, targets):
        parts = Path(p).parts[strip:]
        local = root.joinpath(*parts)
        if names.setdefault(label, parts[-2]) != parts[-2]:
            raise DatasetError(f"{listed_in}: label {label} names two classes, {names[label]!r} and {parts[-2]!r}")
        if not local.is_file():
            missing.append(str(local))
        rows.append((str(local), label, parts[-2]))
    if missing:
        raise DatasetError(f"{len(missing)} images listed in {listed_in} are missing, e.g. {missing[:3]}")
    return sorted(rows)


def imagenet_r_manifests(raw: str | Path, split: dict, lists: str | Path | None = None) -> dict[str, Rows]:
    """``raw`` = the folder holding ``imagenet-r/<wnid>/…``; ``lists`` = the folder of CODA-Prompt's split lists."""
    root = Path(raw) / "imagenet-r"
    if split["rule"] == "coda-prompt":
        out = {}
        for part in ("train", "test"):
            listed_in = Path(lists) / f"imagenet-r_{part}.yaml"
            paths, targets = _read_split_list(listed_in)
            out[part] = _rows_from_list(paths, targets, 2, root, listed_in)  # data/imagenet-r/<wnid>/<file>
        return out
    import torch

    if not root.is_dir():
        raise DatasetError(f"{root} does not exist: expected the extracted imagenet-r.tar (200 wnid folders)")
    wnids = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [(str(root / w / f.name), label, w) for label, w in enumerate(wnids)
             for f in sorted((root / w).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    n_train = int(split["train_fraction"] * len(items))
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(split["seed"])).tolist()
    return {"train": sorted(items[i] for i in perm[:n_train]), "test": sorted(items[i] for i in perm[n_train:])}


def domainnet_manifests(raw: str | Path, lists: str | Path) -> dict[str, Rows]:
    """``raw`` = the folder holding ``<domain>/<class>/…``; ``lists`` = the folder of the DomainNet split lists."""
    out = {}
    for part in ("train", "test"):
        listed_in = Path(lists) / f"domainnet_{part}.yaml"
        paths, targets = _read_split_list(listed_in)
        out[part] = _rows_from_list(paths, targets, 2, Path(raw), listed_in)  # data/DomainNet/<domain>/<class>/<file>
    return out


def benchmark_manifests(spec: dict, raw_root: str | Path, images_dir: str | Path | None) -> dict[str, Rows]:
    """The manifests of an InfLoRA benchmark (cifar100, imagenet-r, domainnet) from its sources under ``raw_root``."""
    raw_root = Path(raw_root)
    if spec["type"] == "cifar100":
        return cifar100_manifests(raw_root / "cifar100", images_dir)
    if spec["type"] == "imagenet-r":
        return imagenet_r_manifests(raw_root / "imagenet-r", spec["split"], raw_root / "coda-prompt-imagenet-r" / "downloads")
    if spec["type"] == "domainnet":
        return domainnet_manifests(raw_root / "domainnet", raw_root / "coda-prompt-domainnet" / "downloads")
    raise ValueError(f"not a benchmark dataset type: {spec['type']!r}")


def sources_of(spec: dict) -> list[str]:
    """The sources (ifcl.data.sources) a benchmark dataset is built from."""
    if spec["type"] == "cifar100":
        return ["cifar100"]
    if spec["type"] == "imagenet-r":
        return ["imagenet-r"] + (["coda-prompt-imagenet-r"] if spec["split"]["rule"] == "coda-prompt" else [])
    if spec["type"] == "domainnet":
        return ["domainnet", "coda-prompt-domainnet"]
    if spec["type"] == "mtil":  # MTIL's CIFAR100 is read from the same download as the InfLoRA benchmark
        return ["cifar100"] if spec["name"] == "cifar100" else [f"mtil-{spec['name']}"]
    if spec["type"] == "captions":
        return caption_sources(spec)
    return []
