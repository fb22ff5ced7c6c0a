"""Manifests: one CSV per dataset and split with columns ``path,label,class_name`` (and ``sha256`` of each image
where the images are the user's: ``folder`` datasets, see :mod:`ifcl.data.folder`).

Every dataset type ends in the same two files (``train.csv``, ``test.csv``) read by the same loader, so a
user's own class-folder tree, the generated demo data and the paper benchmarks all go through one path.
Labels are 0-based positions in the dataset's class list (sorted folder names for ``folder`` data, catalogue
order for generated data). Rows are sorted, so a manifest is byte-identical on every run.

This module is the file format only (writing, reading, the class list of a manifest and the selection of its
rows by class); it imports no other ``ifcl.data`` module. The manifests of each dataset type are made by
:mod:`ifcl.data.folder`, :mod:`ifcl.data.generated`, :mod:`ifcl.data.benchmarks` and :mod:`ifcl.data.mtil`,
dispatched by :mod:`ifcl.data.prepare`.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

from ..files import read_text, write_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
COLUMNS = ("path", "label", "class_name")
IMAGE_DIGEST = "sha256"


class DatasetError(RuntimeError):
    """Missing or malformed data; the message says what was expected where."""


def write_manifest(path: str | Path, rows: list[tuple]) -> None:
    """Rows (path, label, class name) or (path, label, class name, sha256 of the image)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS + ((IMAGE_DIGEST,) if rows and len(rows[0]) == 4 else ()))
    w.writerows(rows)
    write_text(path, buf.getvalue(), rows=len(rows))


def read_manifest(path: str | Path) -> list[tuple[str, int, str]]:
    """The rows of a manifest, checked against its recorded digest and row count (:mod:`ifcl.files`)."""
    r = csv.reader(io.StringIO(read_text(path), newline=""))
    header = tuple(next(r, None) or ())
    if header not in (COLUMNS, COLUMNS + (IMAGE_DIGEST,)):
        raise DatasetError(f"{path}: not an ifcl manifest (header {list(header)}, expected {','.join(COLUMNS)})")
    return [(row[0], int(row[1]), row[2]) for row in r]


def class_names_of(rows: list[tuple[str, int, str]]) -> list[str]:
    """Class names indexed by label; raise if labels are not 0..C-1 or a label has two names."""
    names: dict[int, str] = {}
    for _, label, name, *_ in rows:
        if names.setdefault(label, name) != name:
            raise DatasetError(f"label {label} has two class names: {names[label]!r} and {name!r}")
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"labels are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


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
