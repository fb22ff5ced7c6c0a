"""Per-task artifacts: safetensors files whose every byte is under a digest, and atomic writes.

A state file holds tensors and a JSON-serialisable ``meta`` (what the tensors are, which inputs produced them),
with the digest of both in its header (the format: :mod:`ifcl.statefile`). Loading checks every byte against it
and refuses, naming the file, one that was changed anywhere or was not written by ifcl, so a tampered or truncated
state is never used. Nothing here ever unpickles. Writes are atomic (:mod:`ifcl.files`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load as st_load, save as st_save

from .files import atomic_path
from .statefile import HEADER_KEY, StateFormatError, ifcl_record, layout, state_meta


class StateError(RuntimeError):
    """A state file is missing, unreadable or does not match its recorded digest."""


def state_bytes(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    """The bytes of the state file of ``tensors`` (CPU copies, contiguous) and ``meta``."""
    # each tensor gets its own contiguous storage (InfLoRA shares one R_t for k and v)
    tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    # the tensors' layout does not depend on the metadata: lay them out once to compute the digest
    entries, body = layout(st_save(tensors, metadata={HEADER_KEY: ""}))
    return st_save(tensors, metadata={HEADER_KEY: ifcl_record(entries, body, meta)})


def save_state(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` and the JSON-serialisable ``meta`` atomically to ``path``."""
    data = state_bytes(tensors, meta)
    with atomic_path(path) as f:
        f.write(data)


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a state written by :func:`save_state`; raise :class:`StateError` naming the file if it is missing or
    any of its bytes is not what ifcl wrote."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"state file {path} does not exist")
    raw = path.read_bytes()
    try:
        meta = state_meta(raw)
    except StateFormatError as e:
        raise StateError(f"state file {path} {e}; delete it and re-run its rule (`ifcl check` moves such files "
                         "aside), or restore it with `dvc pull`") from None
    return st_load(raw), meta
