"""Manifests: one CSV per dataset and split with columns ``path,label,class_name``.

Every dataset type ends in the same two files (``train.csv``, ``test.csv``) read by the same loader, so a
user's own class-folder tree, the generated demo data and the paper benchmarks all go through one path.
Labels are 0-based positions in the dataset's class list (sorted folder names for ``folder`` data, catalogue
order for generated data). Rows are sorted, so a manifest is byte-identical on every run.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from ..files import write_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
COLUMNS = ("path", "label", "class_name")


# Transforms without randomness: a decoded-image cache (ifcl.data.decoded) can store their output.
DETERMINISTIC = ("resize", "resize-center-crop", "clip")


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


class DatasetError(RuntimeError):
    """Missing or malformed data; the message says what was expected where."""


def write_manifest(path: str | Path, rows: list[tuple[str, int, str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(rows)
    write_text(path, buf.getvalue())


def read_manifest(path: str | Path) -> list[tuple[str, int, str]]:
    with open(path, newline="") as f:
        r = csv.reader(f)
        header = next(r, None)
        if tuple(header or ()) != COLUMNS:
            raise DatasetError(f"{path}: not an ifcl manifest (header {header}, expected {','.join(COLUMNS)})")
        return [(p, int(label), name) for p, label, name in r]


def class_names_of(rows: list[tuple[str, int, str]]) -> list[str]:
    """Class names indexed by label; raise if labels are not 0..C-1 or a label has two names."""
    names: dict[int, str] = {}
    for _, label, name in rows:
        if names.setdefault(label, name) != name:
            raise DatasetError(f"label {label} has two class names: {names[label]!r} and {name!r}")
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"labels are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"{root} holds no class folders (expected {root}/<class name>/<image files>)")
    return folders


def folder_manifests(path: str | Path, split: dict) -> dict[str, list[tuple[str, int, str]]]:
    """Manifests of a user's class-folder tree.

    ``split = {"rule": "subfolders"}``: ``path/train/<class>/*`` and ``path/test/<class>/*`` (the same class
    folders in both); ``{"rule": "random", "test_fraction": f, "seed": s}``: ``path/<class>/*``, and in each
    class round(f * n) images (at least one, at most n - 1) are held out, chosen by a seeded permutation.
    The stored paths are ``path`` joined with the relative file path, exactly as configured.
    """
    root = Path(path)
    out: dict[str, list] = {"train": [], "test": []}
    if split["rule"] == "subfolders":
        train_classes = [p.name for p in _class_folders(root / "train")]
        test_classes = [p.name for p in _class_folders(root / "test")]
        if train_classes != test_classes:
            raise DatasetError(f"{root}/train and {root}/test must hold the same class folders")
        for label, name in enumerate(train_classes):
            for part in ("train", "test"):
                files = _images_in(root / part / name)
                if not files:
                    raise DatasetError(f"class folder {root / part / name} holds no images")
                out[part] += [(str(root / part / name / f.name), label, name) for f in files]
    else:
        rng = np.random.RandomState(split["seed"])
        for label, folder in enumerate(_class_folders(root)):
            files = _images_in(folder)
            if len(files) < 2:
                raise DatasetError(f"class folder {folder} needs at least 2 images for a train/test split")
            n_test = min(max(1, round(split["test_fraction"] * len(files))), len(files) - 1)
            test_idx = set(rng.permutation(len(files))[:n_test].tolist())
            for i, f in enumerate(files):
                out["test" if i in test_idx else "train"].append((str(folder / f.name), label, folder.name))
    return out


def generated_parts(spec: dict) -> list[dict]:
    """The class slices of a generated dataset: ``parts`` (several domains, labels in the listed order), or the
    single ``domain`` + ``classes``."""
    if "parts" in spec:
        return spec["parts"]
    return [{"domain": spec["domain"], **spec["classes"]}]


def generated_manifests(root: str | Path, spec: dict) -> dict[str, list[tuple[str, int, str]]]:
    """Draw a generated dataset (``spec`` as in the config) into ``root/{train,test}/`` and return its manifests."""
    from .generated import class_slice, write_split

    out: dict[str, list] = {"train": [], "test": []}
    offset, seen = 0, set()
    for part in generated_parts(spec):
        classes = class_slice(part["domain"], part["start"], part["count"])
        if seen & set(classes):
            raise DatasetError(f"generated dataset: classes {sorted(seen & set(classes))} appear in two parts")
        seen.update(classes)
        draws = [("train", spec["train_per_class"], spec["seed"] * 2), ("test", spec["test_per_class"], spec["seed"] * 2 + 1)]
        if spec.get("val_per_class"):
            draws.append(("val", spec["val_per_class"], f"{spec['seed']}-val"))
        for split, n, seed in draws:
            rows = write_split(Path(root) / split, part["domain"], classes, n, spec["image_size"], seed)
            out.setdefault(split, [])
            out[split] += [(os.path.join(str(root), split, rel), offset + label, name) for rel, label, name in rows]
        offset += len(classes)
    return out


def prepare_dataset(spec: dict, train_csv: str, test_csv: str, images_dir: str | None = None,
                    raw_root: str = "data/raw", val_csv: str | None = None) -> None:
    """Manifests of a configured dataset (generated and CIFAR images are written into ``images_dir`` first; the
    paper benchmarks are read from their sources under ``raw_root``, see ifcl.data.benchmarks)."""
    if spec["type"] == "generated":
        parts = generated_manifests(images_dir, spec)
    elif spec["type"] == "folder":
        parts = folder_manifests(spec["path"], spec["split"])
    else:
        from .benchmarks import benchmark_manifests

        parts = benchmark_manifests(spec, raw_root, images_dir)
    if images_dir is not None:
        Path(images_dir).mkdir(parents=True, exist_ok=True)  # a declared output, even when nothing is decoded
    write_manifest(train_csv, parts["train"])
    write_manifest(test_csv, parts["test"])
    if val_csv is not None:  # header only when the dataset has no validation split
        write_manifest(val_csv, parts.get("val", []))
    print(f"{len(class_names_of(parts['train']))} classes, {len(parts['train'])} train / {len(parts['test'])} test images")
