"""Manifests of a user's own class-folder tree (dataset type ``folder``): labels are the positions of the sorted
class folder names."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import IMAGE_SUFFIXES, DatasetError


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
