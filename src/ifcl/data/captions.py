"""Caption datasets: sentences without images, the reference texts that ZSCL distils on
(Thunderbeee/ZSCL mtil/src/datasets/cc.py: the captions of Conceptual Captions' validation set).

A ``captions`` dataset is prepared into one file, ``data/prepared/<dataset>/captions.csv`` (a single ``caption``
column, in the source's order, checked by content when read like every manifest). Source:

* ``conceptual_captions``: Google's ``GCC-1.1.0-Validation.tsv`` (15,840 lines ``caption<TAB>image URL``), every
  caption. ZSCL reads the captions of the rows whose images its own download fetched (a
  ``Validation_GCC-1.1.0-Validation_output.csv`` it does not publish); that subset cannot be rebuilt, so ifcl
  takes all of them (documented in docs/methods.md).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..files import read_text, write_text
from .manifest import DatasetError
from .remote import RemoteFile, Source

SPLIT = "captions"  # the one "split" of a captions dataset: layout.manifest_file(dataset, SPLIT)
HEADER = ("caption",)
CONCEPTUAL_CAPTIONS_VAL = "https://storage.googleapis.com/gcc-data/Validation/GCC-1.1.0-Validation.tsv"

SOURCES = {s.name: s for s in (
    Source("conceptual-captions",
           (RemoteFile(CONCEPTUAL_CAPTIONS_VAL, None, None, dest="GCC-1.1.0-Validation.tsv"),),
           ("GCC-1.1.0-Validation.tsv",),
           "GCC-1.1.0-Validation.tsv (Conceptual Captions' validation list: caption<TAB>image URL per line; no "
           "checksum is published, ifcl records the sha256 of what it downloaded)"),
)}
READERS = {"conceptual_captions": "conceptual-captions"}  # the dataset's `name` -> its source


def sources_of(spec: dict) -> list[str]:
    return [READERS[spec["name"]]]


def source_captions(spec: dict, raw_root: str | Path) -> list[str]:
    """The captions of a ``captions`` dataset spec, read from its source under ``raw_root``."""
    path = Path(raw_root) / READERS[spec["name"]] / "GCC-1.1.0-Validation.tsv"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{path} is missing") from None
    captions = [line.split("\t", 1)[0].strip() for line in lines if line.strip()]
    if not captions:
        raise DatasetError(f"{path} holds no captions")
    return captions


def write_captions(path: str | Path, captions: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    w.writerows([c] for c in captions)
    write_text(path, buf.getvalue(), rows=len(captions))


def read_captions(path: str | Path) -> list[str]:
    """The captions of a prepared captions file, checked against its recorded digest and row count."""
    rows = list(csv.reader(io.StringIO(read_text(path), newline="")))
    if not rows or tuple(rows[0]) != HEADER:
        raise DatasetError(f"{path}: not an ifcl captions file (expected the header '{HEADER[0]}')")
    return [row[0] for row in rows[1:]]
