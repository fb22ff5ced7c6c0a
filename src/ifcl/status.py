"""Where a working directory stands, from its files alone (``ifcl status``): every configured run with its tasks
done, the jobs running now with their phase, epoch, loss, speed and ETA, and the last failure with its log.

It reads the run folders and the jobs' status files (:mod:`ifcl.progress`), never the processes, so it reports a
local run and a cluster run the same way, from any machine that sees the working directory.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from . import layout
from .progress import STALE_SECONDS, STATUS_DIR, duration
from .registry import num_tasks, task_files


def run_progress(config: dict, workdir: str | Path = ".") -> list[dict]:
    """One row per configured run: experiment, seed, tasks done (every file of the task exists), tasks in all,
    and whether its accuracy matrix and metrics are written."""
    workdir = Path(workdir)
    rows = []
    for exp, spec in config["experiments"].items():
        for seed in spec["seeds"]:
            total = num_tasks(spec)
            done = sum(all((workdir / layout.task_file(exp, seed, t, name)).is_file()
                           for name in task_files(spec, t)) for t in range(total))
            finished = all((workdir / layout.run_file(exp, seed, name)).is_file()
                           for name in (layout.ACC_MATRIX, layout.METRICS))
            rows.append({"experiment": exp, "seed": seed, "done": done, "tasks": total, "finished": finished})
    return rows


def job_statuses(workdir: str | Path = ".") -> list[dict]:
    """Every job's last recorded status (logs/.status/**.json), oldest update first; unreadable files are skipped
    (one may be half-replaced at the moment it is read)."""
    jobs = []
    for path in sorted((Path(workdir) / STATUS_DIR).rglob("*.json")):
        try:
            jobs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(jobs, key=lambda j: j.get("updated", 0))


def describe_job(job: dict, now: float) -> str:
    """One line for a running job: rule, wildcards, phase, epoch, loss, accuracy, speed, ETA."""
    parts = [job["rule"], job.get("job") or "-"]
    if job.get("epoch"):
        parts.append(f"epoch {job['epoch']}/{job.get('epochs', '?')}")
    elif job.get("phase"):
        parts.append(job["phase"])
    if job.get("steps") and job.get("step") is not None:
        parts.append(f"batch {job['step']}/{job['steps']}")
    last = job.get("last_epoch") or {}
    if last.get("loss") is not None:
        accuracy = last.get("accuracy")
        parts.append(f"(epoch {last['epoch']}: loss {last['loss']:.4f}"
                     + ("" if accuracy is None else f", acc {accuracy:.1f}%") + ")")
    if job.get("images_per_s"):
        parts.append(f"{job['images_per_s']:.1f} img/s")
    if job.get("eta_s") is not None:
        parts.append(f"ETA {duration(job['eta_s'])}")
    parts.append(f"running {duration(now - job.get('started', now))}")
    silent = now - job.get("updated", now)
    if silent > STALE_SECONDS:
        parts.append(f"NO UPDATE FOR {duration(silent)} (killed? see its log)")
    return "  ".join(parts)


def status_report(config: dict, workdir: str | Path = ".", now: float | None = None) -> str:
    """The text ``ifcl status`` prints."""
    now = time.time() if now is None else now
    runs = run_progress(config, workdir)
    jobs = job_statuses(workdir)
    lines = ["runs"]
    width = max((len(r["experiment"]) for r in runs), default=0)
    for r in runs:
        state = "finished" if r["finished"] else ("" if r["done"] < r["tasks"] else "tasks done, results pending")
        lines.append(f"  {r['experiment']:<{width}}  seed {r['seed']}  {r['done']}/{r['tasks']} tasks  {state}".rstrip())
    tasks_done, tasks = sum(r["done"] for r in runs), sum(r["tasks"] for r in runs)
    lines.append(f"  {sum(r['finished'] for r in runs)}/{len(runs)} runs finished, {tasks_done}/{tasks} tasks done")
    running = [j for j in jobs if j.get("state") == "running"]
    lines.append(f"running jobs: {len(running) or 'none'}")
    for job in running:
        lines.append(f"  {describe_job(job, now)}")
        lines.append(f"    log: {job['log']}  ({job.get('host', '?')}"
                     + (f", SLURM job {job['slurm_job']})" if job.get("slurm_job") else ")"))
    failed = [j for j in jobs if j.get("state") == "failed"]
    if failed:
        last = failed[-1]
        lines.append(f"last failure ({duration(now - last.get('updated', now))} ago; {len(failed)} failed job"
                     f"{'s' * (len(failed) > 1)} not redone since):")
        lines.append(f"  {last['rule']} {last.get('job') or ''}: {last.get('error', '?')}")
        lines.append(f"    log: {last['log']}")
    else:
        lines.append("no failed job")
    return "\n".join(lines)


def console_line(workdir: str | Path = ".", now: float | None = None) -> str | None:
    """The one-line summary the workflow prints every minute while jobs run (None when none reports running)."""
    now = time.time() if now is None else now
    running = [j for j in job_statuses(workdir) if j.get("state") == "running"]
    if not running:
        return None
    shown = "; ".join(describe_job(j, now) for j in running[-3:])
    more = f" (+{len(running) - 3} more)" if len(running) > 3 else ""
    return f"[ifcl] {len(running)} running: {shown}{more}"


def start_console(workdir: str | Path = ".", interval: float = 60.0):
    """Print :func:`console_line` to stderr every ``interval`` seconds while it changes, from a daemon thread (the
    workflow starts it in Snakemake's process). Returns the Event that stops it."""
    import sys
    import threading

    stop = threading.Event()

    def loop():
        last = None
        while not stop.wait(interval):
            line = console_line(workdir)
            if line and line != last:
                print(line, file=sys.stderr, flush=True)
            last = line

    threading.Thread(target=loop, name="ifcl-console", daemon=True).start()
    return stop
