"""What every step shares: its description built from the rule, its device, seeds, threads and precision.

A step of the pipeline is a function of one typed description (a dataclass of the step's module). The description
is built by :func:`from_rule` from what the step's rule gives the job, and from nothing else: its ``output``,
``input``, ``params`` and ``wildcards`` (each field by name), ``threads`` and ``log``. Whatever can change a
result is therefore a rule parameter or an input file, which Snakemake compares before deciding what to re-run;
no step reads the config.

Precision: ``gpu_precision: bf16`` runs the forward and backward passes of training and evaluation on a GPU under
bf16 autocast (:func:`autocast`). Statistics never do: InfLoRA's second moments, the CA class statistics and DIKI's
frozen features, Gaussians and log-likelihoods are computed in float32 (float64 where stated) inside
:func:`full_precision`, whatever the step's precision and whatever autocast context surrounds it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
import types
import typing

import numpy as np
import torch

from .gpu import claim_device


# ---- the step's description ----

def _convert(value, hint):
    """A rule's value as the field's type: ints from wildcards, None for an absent optional input ([] or ""),
    plain lists for Snakemake's named lists."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (not isinstance(value, str) and len(value) == 0) or value == "":
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin = typing.get_origin(hint)
    if hint is int:
        return int(value)
    if hint is str:
        return str(value)
    if origin is list:
        return [str(v) for v in ([value] if isinstance(value, str) else value)]
    return value


def from_rule(cls, job):
    """The step description ``cls`` (a dataclass) of a Snakemake job (the ``snakemake`` object of a script).

    Each field is looked up by name in the job's output, input and params, where it must be in exactly one (a
    name in two is ambiguous), else in its wildcards (the job's identity: experiment, seed, task). ``threads``
    and ``log`` are the job's. A field with a default may be absent; one without is an error naming the rule."""
    hints = typing.get_type_hints(cls)
    sources = {"output": job.output, "input": job.input, "params": job.params, "wildcards": job.wildcards}
    names = {where: {name for name, _ in named.items()} for where, named in sources.items()}
    values = {}
    for field in dataclasses.fields(cls):
        if field.name == "threads":
            values["threads"] = int(job.threads)
            continue
        if field.name == "log":
            values["log"] = str(job.log[0]) if len(job.log) else None
            continue
        found = [where for where in ("output", "input", "params") if field.name in names[where]]
        if not found and field.name in names["wildcards"]:
            found = ["wildcards"]
        if len(found) > 1:
            raise TypeError(f"rule {job.rule}: {field.name!r} is in both {found[0]} and {found[1]}")
        if not found:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise TypeError(f"rule {job.rule} gives no {field.name!r}, which {cls.__name__} needs "
                                f"(name it in the rule's output, input or params)")
            continue
        values[field.name] = _convert(getattr(sources[found[0]], field.name), hints[field.name])
    return cls(**values)


# ---- device, seeds, threads ----

def pick_device() -> torch.device:
    """The job's device: the GPU claimed for it (ifcl.gpu: inherited, or leased from the machine's), else the CPU."""
    if claim_device(log=lambda message: print(message, flush=True)) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print("torch cannot use CUDA here (CPU-only build or no driver): running on CPU", flush=True)
        return torch.device("cpu")
    return torch.device("cuda")


def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, stable across processes and machines (unlike ``hash``)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and Python for one job (each job derives its own seed from its experiment, seed and task)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def start(threads: int, seed: int | None = None) -> torch.device:
    """A step's start: torch's intra-op threads, the global seeds (when given), and the job's device."""
    torch.set_num_threads(threads)
    if seed is not None:
        seed_everything(seed)
    return pick_device()


# ---- precision ----

def autocast(device: str | torch.device, precision: str = "bf16"):
    """The precision of training and evaluation passes on ``device``: with ``precision`` "bf16" (an experiment's
    ``gpu_precision``) CUDA work runs under bf16 autocast; CPU work, and "fp32", run in float32, the official
    precision (CPU runs are the bit-reproducible ones)."""
    device = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and precision == "bf16")


@contextlib.contextmanager
def full_precision():
    """float32 inside, whatever autocast surrounds the call (CUDA's or the CPU's): for statistics."""
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        yield
