"""Per-task artifacts: safetensors + JSON metadata, content hashes and atomic writes.

A state file is one ``.safetensors`` file. Its header metadata holds one string, ``ifcl``: a JSON object with
``meta`` (written by the caller: what the tensors are, which inputs produced them) and ``payload_sha256`` (a digest
of every tensor's name, dtype, shape and bytes). One key, because safetensors writes metadata keys in no fixed
order and the same state must always be the same bytes. Loading recomputes that digest and refuses a file whose tensors were
changed, so a tampered or truncated state is never used. Nothing here ever unpickles.

Writes are atomic (:mod:`ifcl.files`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load, save as st_save

from .files import atomic_path

HEADER_KEY = "ifcl"


class StateError(RuntimeError):
    """A state file is missing, unreadable or does not match its recorded digest."""


def payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Digest of the tensors' names, dtypes, shapes and bytes (independent of the file layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_state(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` (CPU copies, contiguous) and the JSON-serialisable ``meta`` atomically to ``path``."""
    # each tensor gets its own contiguous storage (InfLoRA shares one R_t for k and v)
    tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    header = json.dumps({"meta": meta, "payload_sha256": payload_sha256(tensors)}, sort_keys=True)
    data = st_save(tensors, metadata={HEADER_KEY: header})
    with atomic_path(path) as f:
        f.write(data)


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a state written by :func:`save_state`; raise :class:`StateError` naming the file if it is unreadable
    or its tensors do not match the recorded digest."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"state file {path} does not exist")
    raw = path.read_bytes()
    try:
        tensors = st_load(raw)
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n]).get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise StateError(f"state file {path} is not a valid safetensors file ({e}); delete it and re-run its rule") from e
    try:
        record = json.loads(header[HEADER_KEY])
        meta, digest = record["meta"], record["payload_sha256"]
    except (KeyError, TypeError, ValueError):
        raise StateError(f"state file {path} has no ifcl metadata; it was not written by ifcl") from None
    if payload_sha256(tensors) != digest:
        raise StateError(
            f"state file {path} was modified after it was written (tensor digest mismatch); "
            "delete it and re-run its rule, or restore it with `dvc pull`"
        )
    return tensors, meta
