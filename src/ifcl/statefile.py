"""The bytes of a state file, checked without torch (by ``ifcl check`` before any job, and by every load).

A state file is a ``.safetensors`` file exactly as ``safetensors`` writes it: an 8-byte little-endian header
length, the header (compact JSON: ``__metadata__`` first, then the tensors ordered by item size, largest first, then
by name, each with dtype, shape and data offsets; padded with spaces to a multiple of 8 bytes), and the tensors'
bytes, back to back in header order. Its metadata holds one string, ``ifcl``: a JSON object (sorted keys) with
``meta`` (written by the caller: what the tensors are, which inputs produced them) and ``sha256``, the digest of
every tensor's name, dtype, shape and bytes followed by ``meta``.

:func:`state_meta` accepts only that form: every byte of the file is either fixed by this layout or under the
digest, so a file edited anywhere (a tensor, a metadata value, the header's spacing, bytes appended) is refused
with the reason, and a header that is not what ifcl writes (not JSON, a list, nested beyond reason) is refused the
same way, never a crash.
"""
from __future__ import annotations

import hashlib
import json

HEADER_KEY = "ifcl"
ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
            "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class StateFormatError(ValueError):
    """The bytes are not a state file as ifcl writes it; the message says why (a phrase: "is cut short")."""


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True)


def content_sha256(entries: list[tuple[str, dict]], body: bytes, meta) -> str:
    """Digest of the tensors (``entries``: (name, header entry) in any order; ``body``: the bytes after the
    header) and of ``meta``."""
    h = hashlib.sha256()
    for name, info in sorted(entries):
        begin, end = info["data_offsets"]
        h.update(f"{name}|{info['dtype']}|{list(info['shape'])}|".encode())
        h.update(body[begin:end])
    h.update(b"meta|" + _canonical(meta).encode())
    return h.hexdigest()


def _layout(raw: bytes) -> tuple[dict, list[tuple[str, dict]], bytes]:
    """(metadata, tensor entries in file order, body) of safetensors bytes laid out exactly as safetensors writes
    them; StateFormatError otherwise."""
    if len(raw) < 8:
        raise StateFormatError("is cut short (no header)")
    n = int.from_bytes(raw[:8], "little")
    if n % 8 or 8 + n > len(raw):
        raise StateFormatError("is cut short, or its header length is damaged")
    text = raw[8:8 + n]
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        raise StateFormatError("has a header that is not JSON") from None
    if not isinstance(header, dict):
        raise StateFormatError("has a header that is not a safetensors header (not a JSON object)")
    if not isinstance(header.get("__metadata__"), dict):
        raise StateFormatError("is not a state file written by ifcl (no ifcl metadata)")
    try:
        if json.dumps(header, separators=(",", ":")).encode().ljust(n) != text:
            raise StateFormatError("has a header that was rewritten (its bytes are not as safetensors writes them)")
    except RecursionError:
        raise StateFormatError("has a header nested too deeply") from None
    metadata = header.pop("__metadata__")
    entries = list(header.items())
    offset = 0
    for name, info in entries:
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise StateFormatError(f"has a malformed header entry for tensor {name!r}")
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        count = 1
        for d in shape:
            count *= d
        if dtype not in ITEMSIZE or begin != offset or end - begin != count * ITEMSIZE[dtype]:
            raise StateFormatError(f"has a malformed header entry for tensor {name!r}")
        offset = end
    if [name for name, _ in entries] != [name for name, _ in
                                         sorted(entries, key=lambda e: (-ITEMSIZE[e[1]["dtype"]], e[0]))]:
        raise StateFormatError("has its tensors in an order safetensors does not write")
    body = raw[8 + n:]
    if len(body) != offset:
        raise StateFormatError("is cut short" if len(body) < offset else "has bytes after its last tensor")
    return metadata, entries, body


def layout(raw: bytes) -> tuple[list[tuple[str, dict]], bytes]:
    """(tensor entries, body) of bytes safetensors wrote with any metadata (for :func:`ifcl_record`)."""
    return _layout(raw)[1:]


def state_meta(raw: bytes):
    """The ``meta`` of a state file's bytes, once every byte is checked (see the module docstring); raise
    :class:`StateFormatError` saying why it is refused."""
    try:
        metadata, entries, body = _layout(raw)
    except (TypeError, ValueError) as e:
        if isinstance(e, StateFormatError):
            raise
        raise StateFormatError("has a malformed header") from None
    if set(metadata) != {HEADER_KEY}:
        raise StateFormatError("is not a state file written by ifcl (no ifcl metadata, or metadata added)")
    try:
        record = json.loads(metadata[HEADER_KEY])
        canonical = isinstance(record, dict) and _canonical(record) == metadata[HEADER_KEY]
    except (TypeError, ValueError, RecursionError):
        record, canonical = None, False
    if isinstance(record, dict) and set(record) == {"meta", "payload_sha256"}:
        raise StateFormatError("was written by an earlier ifcl whose digest did not cover the metadata")
    if not canonical or set(record) != {"meta", "sha256"}:
        raise StateFormatError("is not a state file written by ifcl (its ifcl metadata is not what ifcl writes)")
    if content_sha256(entries, body, record["meta"]) != record["sha256"]:
        raise StateFormatError("was modified after it was written (its tensors or metadata do not match its digest)")
    return record["meta"]


def ifcl_record(entries: list[tuple[str, dict]], body: bytes, meta) -> str:
    """The ``ifcl`` metadata string of a state file with these tensors and ``meta``."""
    return _canonical({"meta": meta, "sha256": content_sha256(entries, body, meta)})
