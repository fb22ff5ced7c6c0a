"""Atomic file writes, and text files that carry their digest (no torch: light pipeline steps import only this).

Every write goes to a temporary file in the destination folder and is renamed into place only once complete, so
an interrupted job never leaves a file that looks finished.

Every text file a step writes (manifests, ``tasks.json``, ``eval.json``, the logs of epochs, ``acc_matrix.csv``,
``metrics.json``, the summaries) has its sha256 beside it, in ``<file>.sha256`` (the format of ``sha256sum``, so
``sha256sum -c eval.json.sha256`` checks it by hand; a CSV's digest file also records its number of data rows, on a
``#`` line that ``sha256sum`` ignores). :func:`read_text` and :func:`read_json` refuse a file that does not match
its digest, or has none, with an error naming it: a file edited, cut or damaged after its step wrote it is never
used. (State files carry their digest inside: :mod:`ifcl.state`.)
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; on success fsync and rename it to ``path``, on error delete it. A
    successful write also deletes the temporary files of earlier writes of ``path`` that were killed outright
    (SIGKILL, power loss), which had no chance to delete their own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.part"):
        stale.unlink(missing_ok=True)


DIGEST_SUFFIX = ".sha256"


class FileCheckError(RuntimeError):
    """A file does not match its recorded digest, or has no digest where one is expected."""


def digest_file(path: str | os.PathLike) -> Path:
    """The file holding ``path``'s recorded sha256."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def write_text(path: str | os.PathLike, text: str, rows: int | None = None) -> None:
    """Write ``text`` to ``path`` and its sha256 (and, for a table, its number of data ``rows``) beside it."""
    data = text.encode()
    with atomic_path(path) as f:
        f.write(data)
    record = f"{hashlib.sha256(data).hexdigest()}  {Path(path).name}\n"
    if rows is not None:
        record += f"# rows: {rows}\n"
    with atomic_path(digest_file(path), "w") as f:
        f.write(record)


def recorded_digest(path: str | os.PathLike) -> tuple[str, int | None] | None:
    """(sha256, rows or None) recorded beside ``path``, or None if it has no digest file."""
    try:
        lines = digest_file(path).read_bytes().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return None
    # a damaged digest file gives a sha256 that matches nothing (so the file and it are moved aside together)
    sha = lines[0].split()[0] if lines and lines[0].split() else ""
    rows = [line.split(":", 1)[1].strip() for line in lines[1:] if line.startswith("# rows:")]
    return sha, int(rows[0]) if rows and rows[0].isdigit() else None


def check_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Raise :class:`FileCheckError` naming ``path`` unless ``data`` (its content) matches its recorded digest."""
    record = recorded_digest(path)
    if record is None:
        raise FileCheckError(f"{path} has no recorded digest ({digest_file(path).name} is missing): it was not "
                             "written by an ifcl step, or its step did not finish; delete it and re-run its rule")
    sha, rows = record
    if hashlib.sha256(data).hexdigest() != sha:
        what = "was changed after its step wrote it"
        if rows is not None:
            found = max(0, data.count(b"\n") - 1)
            if found != rows:
                what = f"has {found} data rows where its step wrote {rows}"
        raise FileCheckError(f"{path} {what} (sha256 mismatch with {digest_file(path).name}); delete it and re-run "
                             "its rule (`ifcl check` moves such files aside), or restore it with `dvc pull`")


def read_text(path: str | os.PathLike) -> str:
    """The text of a file written by :func:`write_text`, checked against its digest."""
    data = Path(path).read_bytes()
    check_bytes(path, data)
    return data.decode()


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(read_text(path))


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rows as CSV: the header is every key in the order first met, a row's missing keys empty cells."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in rows for k in row)), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue(), rows=len(rows))


def read_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a CSV written by :func:`write_csv`, checked against its digest."""
    return list(csv.DictReader(io.StringIO(read_text(path))))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
