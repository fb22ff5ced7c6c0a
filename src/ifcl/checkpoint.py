"""Epoch checkpoints: a training job that is told to stop continues where it stopped, with the same bytes.

A cluster preempts long jobs, or stops them at their time limit, with SIGTERM; Ctrl-C stops a local workflow with
SIGINT (and Snakemake passes SIGTERM on to its jobs). A training loop keeps, after each epoch, a copy of everything
the next epochs depend on, in memory: the module's tensors, the optimiser's state, the epoch index (the schedule is
a function of it), every random generator (torch's on the CPU and each GPU, NumPy's, Python's, and the loader's
own, whose state is the loader's position: the next epoch's shuffle and worker seeds) and the loop's log rows. When
the job is stopped, the last copy is written to ``checkpoints/<rule>/<job>.safetensors``, a state file like every other
(safetensors and JSON, written atomically, every byte under its digest: :mod:`ifcl.state`), and the job exits with an
error, so Snakemake tries it again (``retries`` in the SLURM profile) or the next
``snakemake`` runs it again. That attempt runs the step from its first line as any job does (same seeds, same model
built from the same inputs), and the training loop, finding the checkpoint, restores it and goes on from the next
epoch. On the CPU the task's files are byte-identical to those of a run that was never stopped
(``tests/test_checkpoint.py``); at most the interrupted epoch is computed again.

A checkpoint is used only by the job that wrote it, with the same settings and inputs: it carries a fingerprint of
the job's rule, wildcards, params (the code's digest among them) and input files (the sha256 ifcl recorded for each,
else its size and modification time). A checkpoint of other settings or inputs, or one whose bytes do not match its
digest, is removed and the task starts from its first epoch, saying so in the log. The job's checkpoint is removed
once its outputs are written. ``checkpoints/`` is neither a result nor tracked by DVC or git.

Loops that keep checkpoints: :func:`ifcl.training.train_classifier` (InfLoRA's and the state chain's training, the
demo's pretraining) and DIKI's prefix training. A job with several loops numbers them; a stopped job runs the loops
before the stopped one again (deterministically) and resumes that one.
"""
from __future__ import annotations

import hashlib
import json
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from .files import recorded_digest

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

ROOT = Path("checkpoints")


@dataclass
class JobCheckpoint:
    """Where the running job keeps its checkpoint, and the fingerprint a checkpoint must carry to be resumed
    (given, or computed from the job's ``snakemake`` object when a training loop first needs it)."""

    path: Path
    given_fingerprint: str | None = None
    log: Path | None = None  # the job's log: the stopped attempt's lines travel in its checkpoint
    snakemake: object = None
    loops: int = 0  # training loops this job has started
    written: str | None = None  # what the last write saved, for the job's last log line

    @property
    def fingerprint(self) -> str:
        if self.given_fingerprint is None:
            job = self.snakemake
            self.given_fingerprint = fingerprint(job.rule, dict(job.wildcards.items()), dict(job.params.items()),
                                                 [str(f) for f in job.input])
        return self.given_fingerprint

    @fingerprint.setter
    def fingerprint(self, value: str) -> None:
        self.given_fingerprint = value


_job: JobCheckpoint | None = None


def path_for(log: str | Path) -> Path:
    """``logs/<rule>/<job>.log`` -> ``checkpoints/<rule>/<job>.safetensors``."""
    parts = Path(log).with_suffix(".safetensors").parts
    return ROOT.joinpath(*(parts[1:] if len(parts) > 1 and parts[0] == "logs" else parts))


def content_id(path: str | Path) -> list:
    """What an input file holds, cheaply: the sha256 ifcl recorded for it (in a state file's header, or beside a
    text file), else its size and modification time."""
    path = Path(path)
    try:
        recorded = recorded_digest(path)
        if recorded is not None:
            return ["sha256", recorded[0]]
        if path.suffix == ".safetensors" and path.is_file():
            with open(path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            return ["sha256", json.loads(header["__metadata__"]["ifcl"])["sha256"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [None, None]


def fingerprint(rule: str, wildcards: dict, params: dict, inputs: Iterable[str]) -> str:
    """A digest of what the job computes from: its rule, wildcards, params and each input file's content
    (:func:`content_id`; a job run again upstream that wrote the same content keeps the checkpoint usable)."""
    files = [[name, *content_id(name)] for name in sorted(set(map(str, inputs)))]
    text = json.dumps({"rule": rule, "wildcards": wildcards, "params": params, "inputs": files}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def start_job(snakemake) -> None:
    """Called by :func:`ifcl.runlog.job` for every job: the training loops of this process use its checkpoint."""
    global _job
    _job = JobCheckpoint(path_for(snakemake.log[0]), log=Path(snakemake.log[0]), snakemake=snakemake)


def finish_job(success: bool) -> None:
    """The job's outputs are written: its checkpoint is of no more use. A failed job keeps it."""
    global _job
    if _job is not None and success:
        _job.path.unlink(missing_ok=True)
    _job = None


def stop_message() -> str | None:
    """What the job's last log line says about its checkpoint when it was stopped."""
    return None if _job is None else _job.written


# ---- what a snapshot holds ----

def _cpu_copy(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def random_state(generators: Sequence[torch.Generator]) -> dict:
    """Every random generator a training loop draws from: torch's (CPU, every initialised GPU), NumPy's, Python's
    and the loop's own (a loader's shuffle and worker seeds)."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(internal), gauss_next],
            "generators": [g.get_state() for g in generators]}


def set_random_state(state: dict, generators: Sequence[torch.Generator]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if len(state["generators"]) != len(generators):
        raise ValueError("the checkpoint has another number of generators than the loop")
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)


def loader_generators(loader) -> list[torch.Generator]:
    """The generator a loader (a DataLoader, or a wrapper with a ``loader``) shuffles and seeds its workers with."""
    while loader is not None:
        if getattr(loader, "generator", None) is not None:
            return [loader.generator]
        loader = getattr(loader, "loader", None)
    return []


def split(obj, tensors: dict, path: str = "") -> dict:
    """``obj`` (nested dicts, lists, tuples, tensors, numbers, strings) as JSON, its tensors moved into ``tensors``
    under their path: what a state file holds (safetensors and JSON). Dicts keep their keys' types (an optimiser's
    state is keyed by parameter index)."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"tensor": path}
    if isinstance(obj, dict):
        return {"items": [[k, split(v, tensors, f"{path}/{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [split(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    return {"value": obj}


def joined(structure: dict, tensors: dict):
    """The object :func:`split` took apart."""
    (kind, value), = structure.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "items":
        return {k: joined(v, tensors) for k, v in value}
    if kind in ("list", "tuple"):
        items = [joined(v, tensors) for v in value]
        return items if kind == "list" else tuple(items)
    return value


# ---- one training loop ----

class Loop:
    """The checkpoint of one training loop of the running job (see :func:`resumable`)."""

    def __init__(self, job: JobCheckpoint | None, index: int, name: str, state: nn.Module | Sequence[torch.Tensor],
                 optimizer: torch.optim.Optimizer, generators: Sequence[torch.Generator]):
        self.job, self.index, self.name = job, index, name
        self.state, self.optimizer, self.generators = state, optimizer, list(generators)
        self.pending: dict | None = None  # the last epoch's snapshot, written if the job is stopped

    def _tensors(self) -> dict[str, torch.Tensor]:
        import torch.nn as nn

        if isinstance(self.state, nn.Module):
            return self.state.state_dict()
        return {str(i): t for i, t in enumerate(self.state)}

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        import torch
        import torch.nn as nn

        if isinstance(self.state, nn.Module):
            self.state.load_state_dict(tensors)
            return
        with torch.no_grad():
            for i, t in enumerate(self.state):
                t.copy_(tensors[str(i)])

    def resume(self) -> tuple[int, dict]:
        """The first epoch to run and the extras saved with it: (0, {}) without a usable checkpoint; otherwise the
        module, optimiser and generators are restored as they were after epoch ``first - 1``."""
        from .state import load_state

        if self.job is None or not self.job.path.exists():
            return 0, {}
        path, why = self.job.path, None
        try:
            tensors, meta = load_state(path)  # its every byte checked against its digest
            saved = joined(meta["checkpoint"], tensors)
            if meta["fingerprint"] != self.job.fingerprint:
                why = "it was written with other settings, code or inputs"
            elif meta["loop"] > self.index:  # a later loop's: this one had run to its end before
                return 0, {}
            elif meta["loop"] < self.index:  # an earlier loop's, which has now run to its end
                path.unlink(missing_ok=True)
                return 0, {}
            elif meta["name"] != self.name:
                why = f"it is of the loop {meta['name']!r}"
        except Exception as e:  # a damaged or unreadable file is no checkpoint
            why = f"it cannot be used ({type(e).__name__}: {e})"
        if why is not None:
            return self._stale(path, why)
        self._load_tensors(saved["tensors"])
        self.optimizer.load_state_dict(saved["optimizer"])
        set_random_state(saved["random"], self.generators)
        first = saved["epoch"] + 1
        if meta.get("log"):  # Snakemake removes a job's log before it runs again: the stopped attempt's lines
            print(f"---- the stopped attempt's log, up to its checkpoint ----\n{meta['log'].rstrip()}\n"
                  "---- end of the stopped attempt's log ----", flush=True)
        print(f"{self.name}: resumed from the epoch checkpoint {path} (written "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(meta['time']))}): epochs 1-{first} done, "
              f"continuing with epoch {first + 1}", flush=True)
        return first, saved["extra"]

    def _stale(self, path: Path, why: str) -> tuple[int, dict]:
        print(f"{self.name}: the checkpoint {path} is not used ({why}); it is removed and the task starts from its "
              "first epoch", flush=True)
        path.unlink(missing_ok=True)
        return 0, {}

    def epoch_done(self, epoch: int, **extra) -> None:
        """Keep (in memory) what the loop needs to continue after ``epoch``: written only if the job is stopped."""
        if self.job is not None:
            self.pending = {"epoch": epoch, "tensors": _cpu_copy(self._tensors()),
                            "optimizer": _cpu_copy(self.optimizer.state_dict()),
                            "random": _cpu_copy(random_state(self.generators)), "extra": _cpu_copy(extra)}

    def write(self) -> None:
        """Write the last epoch's snapshot atomically (signals held back meanwhile)."""
        if self.job is None or self.pending is None:
            return
        from .state import save_state

        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            message = (f"{self.name}: stopped; epoch checkpoint written to {self.job.path} after epoch "
                       f"{self.pending['epoch'] + 1}; the next attempt continues from it")
            try:
                log = self.job.log.read_text(errors="replace") if self.job.log else ""
            except OSError:
                log = ""
            tensors: dict = {}
            structure = split(self.pending, tensors)
            self.job.path.parent.mkdir(parents=True, exist_ok=True)
            save_state(self.job.path, tensors, {
                "kind": "epoch_checkpoint", "checkpoint": structure, "fingerprint": self.job.fingerprint,
                "loop": self.index, "name": self.name, "time": time.time(), "log": log.rstrip("\n") + "\n" + message})
            self.job.written = message
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


@contextmanager
def resumable(name: str, state: nn.Module | Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
              generators: Sequence[torch.Generator] = ()):
    """A training loop that survives being stopped::

        with resumable("task 3", model, opt, loader_generators(loader)) as loop:
            first, extra = loop.resume()
            for epoch in range(first, epochs):
                ...
                loop.epoch_done(epoch, rows=rows)

    ``state``: the module whose ``state_dict`` holds every tensor training changes (or those tensors). Stopped by
    SIGTERM (:class:`ifcl.runlog.Terminated`) or SIGINT (KeyboardInterrupt), the last ``epoch_done`` snapshot is
    written before the exception goes on. Outside a workflow job (tests, benchmarks) nothing is kept."""
    from .runlog import Terminated

    job = _job
    index = 0
    if job is not None:
        index, job.loops = job.loops, job.loops + 1
    loop = Loop(job, index, name, state, optimizer, generators)
    try:
        yield loop
    except (Terminated, KeyboardInterrupt):
        loop.write()
        raise
