"""Manifests of a user's own class-folder tree (dataset type ``folder``): labels are the positions of the sorted
class folder names.

The folder is tracked by content. The manifest rule depends on :func:`folder_fingerprint` (every file's path,
size, modification time and change time, read with one ``stat`` each), so an image added, removed, renamed, edited
or replaced, even by a copy that keeps the old times, re-runs it; the manifest lists each image's sha256, so what
reads the images re-runs exactly when an image's content changed. Every image is decoded once when the manifest
is made, to 8-bit RGB as training reads it (:func:`ifcl.data.transforms.to_rgb`). Unreadable are: a file that does
not decode or whose mode cannot be converted, a link that does not resolve (dangling, or a loop) and a file whose
name is not valid UTF-8 (a manifest is UTF-8 text). An unreadable image is an error naming it (or, with
``skip_unreadable: true``, left out and named in the log); files that are not images are named in the log. Names
that are not valid UTF-8 are shown with those bytes as ``\\xNN`` (:func:`shown`).
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from .manifest import IMAGE_SUFFIXES, DatasetError
from .transforms import to_rgb


def shown(path: str | Path) -> str:
    """``path`` as text that prints and writes anywhere: the bytes of a name that are not valid UTF-8 as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(path: str | Path) -> bool:
    return shown(path) == str(path)


def folder_fingerprint(path: str | Path) -> str:
    """A digest of the stat signature of every file under ``path`` (hidden files and folders left out).

    It raises for no file, since Snakemake calls it while it builds the DAG: a link that does not resolve (dangling,
    or a loop) counts by its own stat and its link text, a name that is not valid UTF-8 by its bytes; the manifest
    rule then names such files (:func:`folder_manifests`)."""
    root = Path(path)
    h = hashlib.sha256()
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            file = os.path.join(dirpath, name)
            h.update(f"{os.path.relpath(file, root)}\0{_signature(file)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def _signature(file: str) -> str:
    """Size, modification and change time of a file; of a link that does not resolve, those of the link and its
    text."""
    try:
        st = os.stat(file)
        return f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    except OSError:
        pass
    try:
        st = os.lstat(file)
        return f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0link\0{os.readlink(file)}"
    except OSError:  # gone since it was listed, or not a link
        return "unreadable"


def _images_in(folder: Path, others: list[Path]) -> list[Path]:
    """The image files of a class folder, sorted (links that do not resolve included, to be named as unreadable);
    its other files go to ``others``. Hidden files are left out."""
    files = sorted(p for p in folder.iterdir()
                   if not p.name.startswith(".") and (p.is_file() or (p.is_symlink() and not p.exists())))
    others += [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    return [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]


def _checked_bytes(path: Path) -> tuple[bytes, str]:
    """The bytes of an image file and "", or b"" and why it is not a readable image."""
    from PIL import Image

    if not _is_utf8(path):
        return b"", "its name is not valid UTF-8, which a manifest cannot hold"
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            to_rgb(im)
        return data, ""
    except Exception as e:  # noqa: BLE001  (Pillow raises many kinds for a damaged file)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if path.is_symlink():
            reason = f"a link to {shown(os.readlink(path))}: {reason}"
        return b"", reason


def image_sha256(path: Path, skip_unreadable: bool) -> str | None:
    """The sha256 of an image file that decodes to 8-bit RGB (:func:`ifcl.data.transforms.to_rgb`); None if it is
    unreadable (see the module) and ``skip_unreadable`` (it is named in the log), else a :class:`DatasetError`
    naming it."""
    data, reason = _checked_bytes(path)
    if not reason:
        return hashlib.sha256(data).hexdigest()
    if skip_unreadable:
        print(f"skipped, not a readable image: {shown(path)} ({reason})")
        return None
    raise DatasetError(f"{shown(path)} is not a readable image ({reason}); remove, replace or rename it, or set "
                       "skip_unreadable: true on the dataset to leave such files out")


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"{root} holds no class folders (expected {root}/<class name>/<image files>)")
    for p in folders:
        if not _is_utf8(p):
            raise DatasetError(f"class folder {shown(p)}: its name is not valid UTF-8, which a manifest cannot hold "
                               "(class names are written to it); rename it")
    return folders


def folder_manifests(path: str | Path, split: dict, skip_unreadable: bool = False) -> dict[str, list[tuple]]:
    """Manifests of a user's class-folder tree: rows (path, label, class name, sha256 of the image).

    ``split = {"rule": "subfolders"}``: ``path/train/<class>/*`` and ``path/test/<class>/*`` (the same class
    folders in both); ``{"rule": "random", "test_fraction": f, "seed": s}``: ``path/<class>/*``, and in each
    class round(f * n) images (at least one, at most n - 1) are held out, chosen by a seeded permutation.
    The stored paths are ``path`` joined with the relative file path, exactly as configured.
    """
    root = Path(path)
    out: dict[str, list] = {"train": [], "test": []}
    others: list[Path] = []

    def readable(files: list[Path]) -> list[tuple[Path, str]]:
        checked = [(f, image_sha256(f, skip_unreadable)) for f in files]
        return [(f, sha) for f, sha in checked if sha is not None]

    if split["rule"] == "subfolders":
        train_classes = [p.name for p in _class_folders(root / "train")]
        test_classes = [p.name for p in _class_folders(root / "test")]
        if train_classes != test_classes:
            raise DatasetError(f"{root}/train and {root}/test must hold the same class folders")
        for label, name in enumerate(train_classes):
            for part in ("train", "test"):
                files = readable(_images_in(root / part / name, others))
                if not files:
                    raise DatasetError(f"class folder {root / part / name} holds no images")
                out[part] += [(str(root / part / name / f.name), label, name, sha) for f, sha in files]
    else:
        rng = np.random.RandomState(split["seed"])
        for label, folder in enumerate(_class_folders(root)):
            files = readable(_images_in(folder, others))
            if len(files) < 2:
                raise DatasetError(f"class folder {folder} needs at least 2 images for a train/test split")
            n_test = min(max(1, round(split["test_fraction"] * len(files))), len(files) - 1)
            test_idx = set(rng.permutation(len(files))[:n_test].tolist())
            for i, (f, sha) in enumerate(files):
                out["test" if i in test_idx else "train"].append((str(folder / f.name), label, folder.name, sha))
    if others:
        names = ", ".join(shown(p) for p in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        print(f"not images, left out: {len(others)} files ({names}); images end in {', '.join(sorted(IMAGE_SUFFIXES))}")
    return out
