"""What a running step tells a person, and where.

- **Its log file** (``logs/<rule>/...log``) gets plain lines: one per epoch (epoch, loss, accuracy, lr, seconds,
  images/s) and, during a long loop, one line a minute with the position, the speed and the ETA. No carriage
  returns: the file reads the same in ``less``, an editor or ``tail -f``. A live bar is drawn only when the
  output is a terminal.
- **Its status file** (``logs/.status/<rule>/...json``, the log's path under ``logs/.status``), rewritten every
  few seconds: the job's rule, wildcards, log, host, state (``running``, ``done``, ``failed`` with the error), phase,
  epoch, loss, images/s and ETA. ``ifcl status`` and the workflow's console summary read these files, not the
  processes, so they work the same for local and cluster jobs.

Nothing here writes under ``results/``: result files stay free of times and speeds.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

STATUS_DIR = Path("logs") / ".status"
LINE_SECONDS = 60.0  # a progress line in the log at most this often
STATUS_SECONDS = 5.0  # the status file rewritten at most this often
STALE_SECONDS = 600.0  # a running job whose status file is older than this may have been killed

_job: dict | None = None  # the running job's status (None outside a workflow job)
_written = 0.0


def status_file(log: str | Path) -> Path:
    """Where the status of the job logging to ``log`` is kept: ``logs/a/b.log`` -> ``logs/.status/a/b.json``."""
    log = Path(log)
    parts = log.with_suffix(".json").parts
    if len(parts) > 1 and parts[0] == "logs":
        return STATUS_DIR.joinpath(*parts[1:])
    return log.with_name(log.name + ".status.json")


def _write(force: bool = False) -> None:
    global _written
    now = time.time()
    if _job is None or (not force and now - _written < STATUS_SECONDS):
        return
    _job["updated"] = now
    path = Path(_job["status_file"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_job, indent=1) + "\n")
    os.replace(tmp, path)
    _written = now


def start_job(rule: str, wildcards: dict, log: str | Path) -> None:
    """Record that this process runs ``rule`` for ``wildcards``, logging to ``log``."""
    global _job
    parts = Path(log).with_suffix("").parts  # logs/<rule>/<exp>/seed<k>/task<t>.log names the job for people
    name = "/".join(parts[2:]) if len(parts) > 2 and parts[0] == "logs" else "/".join(map(str, wildcards.values()))
    _job = {"rule": rule, "wildcards": {k: str(v) for k, v in wildcards.items()}, "job": name, "log": str(log),
            "status_file": str(status_file(log)), "host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "state": "running", "started": time.time()}
    _write(force=True)


def finish_job(error: BaseException | None = None) -> None:
    """Record the end of the job: ``done``, or ``failed`` with the error's type and message."""
    global _job
    if _job is None:
        return
    _job["state"] = "done" if error is None else "failed"
    if error is not None:
        _job["error"] = f"{type(error).__name__}: {error}".strip()
    for key in ("eta_s", "step", "steps", "training_started"):
        _job.pop(key, None)
    _write(force=True)
    _job = None


def report(**fields) -> None:
    """Update the running job's status (phase, epoch, loss, ...); written at most every few seconds."""
    if _job is not None:
        _job.update(fields)
        _write()


def duration(seconds: float) -> str:
    """``1:02:03`` or ``2:03``."""
    seconds = int(round(max(seconds, 0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _images(item) -> int:
    """Images in one item of a loop: a batch (x, y) counts len(x); anything else counts one."""
    if isinstance(item, (tuple, list)) and item and hasattr(item[0], "__len__"):
        return len(item[0])
    return 1


def track(items: Iterable, desc: str, total: int | None = None, epoch: int | None = None,
          epochs: int | None = None, unit: str = "batches") -> Iterator:
    """Iterate over ``items`` (batches, usually), telling a person where the loop is: a bar on a terminal,
    otherwise a line a minute in the log; the status file gets the position, the speed and the ETA. With
    ``epoch`` (0-based) of ``epochs``, the ETA is for the whole training, from the time the first epoch began."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, leave=False)
    now = time.time()
    if _job is not None and not epoch:  # a loop outside training, or the first epoch
        _job["training_started"] = now
    start, last_line, step, images = now, now, 0, 0
    try:
        for item in items:
            yield item
            step += 1
            images += _images(item)
            if bar is not None:
                bar.update()
            now = time.time()
            rate = images / max(now - start, 1e-9)
            eta = None
            if total:
                done = step / total
                if epoch is not None and epochs:
                    done = (epoch + done) / epochs
                    since = now - (_job or {}).get("training_started", start)
                else:
                    since = now - start
                eta = since * (1 - done) / max(done, 1e-9)
            if _job is not None and now - _written >= STATUS_SECONDS:
                report(phase=desc, step=step, steps=total, images_per_s=round(rate, 1),
                       eta_s=None if eta is None else round(eta), **_epoch_fields(epoch, epochs))
            if bar is None and now - last_line >= LINE_SECONDS:
                position = f"{step}/{total}" if total else str(step)
                print(f"{desc}: {position} {unit}, {rate:.1f} img/s"
                      + ("" if eta is None else f", ETA {duration(eta)}"), flush=True)
                last_line = now
    finally:
        if bar is not None:
            bar.close()


def _epoch_fields(epoch: int | None, epochs: int | None) -> dict:
    return {} if epoch is None else {"epoch": epoch + 1, "epochs": epochs}


def epoch_done(desc: str, epoch: int, epochs: int, seconds: float, images: int, **metrics: float) -> str:
    """The log line of a finished epoch (``epoch`` 0-based), also recorded in the status file; returns it.
    ``metrics``: loss, accuracy (%), lr and the like, printed in that order."""
    parts = []
    for name, value in metrics.items():
        if name.endswith("acc") or "accuracy" in name:
            parts.append(f"{name.replace('_', ' ')} {value:.2f}%")
        elif name.startswith("lr"):
            parts.append(f"{name.replace('_', ' ')} {value:.3g}")
        else:
            parts.append(f"{name.replace('_', ' ')} {value:.4f}")
    rate = images / max(seconds, 1e-9)
    line = f"{desc} epoch {epoch + 1}/{epochs}: {', '.join(parts)}, {seconds:.1f} s, {rate:.1f} img/s"
    print(line, flush=True)
    if _job is not None:
        since = time.time() - _job.get("training_started", time.time())
        _job.update(phase=desc, epoch=epoch + 1, epochs=epochs, images_per_s=round(rate, 1),
                    eta_s=round(since * (epochs - epoch - 1) / (epoch + 1)),
                    last_epoch={"epoch": epoch + 1, **{k: round(float(v), 6) for k, v in metrics.items()}})
        _write(force=True)
    return line


class PassLog:
    """The ``log(step, loss, lr, accuracy %)`` callback of a training loop that counts steps, not epochs (the MTIL
    fine-tuning family, MoE-Adapters): one row per pass of ``per_pass`` steps over the dataset (the last one may be
    partial) in ``rows`` (epoch, mean loss, mean batch accuracy, the last learning rate), each announced by
    :func:`epoch_done`."""

    def __init__(self, desc: str, per_pass: int, steps: int):
        self.desc, self.per_pass, self.steps = desc, per_pass, steps
        self.passes = -(-steps // per_pass)
        self.rows: list[dict] = []
        self._loss = self._accuracy = 0.0
        self._count = 0
        self._began = time.perf_counter()

    def __call__(self, n: int, loss: float, lr: float, accuracy: float) -> None:
        self._loss += loss
        self._accuracy += accuracy
        self._count += 1
        if (n + 1) % self.per_pass == 0 or n == self.steps - 1:
            k = self._count
            self.rows.append({"epoch": len(self.rows), "loss": self._loss / k, "train_accuracy": self._accuracy / k,
                              "lr_last": lr})
            epoch_done(self.desc, len(self.rows) - 1, self.passes, time.perf_counter() - self._began, k,
                       loss=self.rows[-1]["loss"], accuracy=self.rows[-1]["train_accuracy"], lr=lr)
            self._loss = self._accuracy = 0.0
            self._count = 0
