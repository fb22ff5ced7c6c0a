"""What a cluster run submits, from a dry run: its jobs, its SLURM submissions and the longest chain of submissions
that must run one after another (each waits in the queue), for every job grouping (config key ``job_groups``).

Job groups (``workflow/rules/common.smk``: ``job_group``): the rules of a run's chain name a group, ``run`` or
``task{t}`` (:func:`group_pattern`); on a cluster the jobs of one group that depend on one another are one
submission (a connected component of the group's jobs). Local rules (``localrule: True``) run where Snakemake
runs and are never submitted. ``ifcl bench scale`` prints these counts (docs/running.md, BENCHMARKS.md).
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

MODES = ("none", "task", "run")


def group_pattern(mode: str, per_task: bool = True) -> str | None:
    """The group of a run's rule under ``job_groups: mode``: ``run`` (static, so that ``--group-components run=N``
    can pack runs), ``task{t}`` (one group per task; a rule without tasks stays in ``run``), or none."""
    if mode not in MODES:
        raise ValueError(f"job_groups must be one of {MODES}, not {mode!r}")
    if mode == "none":
        return None
    return "task{t}" if mode == "task" and per_task else "run"


@dataclass
class Job:
    rule: str
    wildcards: dict[str, str]
    inputs: list[str]
    outputs: list[str]


def rule_kinds(rules_dir: Path) -> dict[str, str]:
    """Each rule of the workflow's rule files: ``local``, ``grouped`` (job_group()), ``grouped-run``
    (job_group(per_task=False)) or ``job``."""
    kinds = {}
    for chunk in "\n".join(p.read_text() for p in sorted(Path(rules_dir).glob("*.smk"))).split("\nrule ")[1:]:
        name = chunk.split(":", 1)[0].strip()
        if "\n    localrule: True" in chunk:
            kinds[name] = "local"
        elif "job_group(per_task=False)" in chunk:
            kinds[name] = "grouped-run"
        elif "job_group()" in chunk:
            kinds[name] = "grouped"
        else:
            kinds[name] = "job"
    return kinds


def parse_dry_run(text: str) -> list[Job]:
    """The jobs a `snakemake -n` printed (rule, wildcards, input and output files of each)."""
    jobs = []
    for block in re.split(r"\n\s*rule (?=\w+:\n)", "\n" + text)[1:]:
        name, _, body = block.partition(":\n")
        fields = {}
        for line in body.splitlines():
            m = re.match(r"\s+(input|output|wildcards): (.*)$", line)
            if m:
                fields[m.group(1)] = m.group(2)
            elif line.strip() and not line.startswith(" "):
                break
        wildcards = dict(item.split("=", 1) for item in fields.get("wildcards", "").split(", ") if "=" in item)
        files = {key: [f for f in fields.get(key, "").split(", ") if f] for key in ("input", "output")}
        jobs.append(Job(name.strip(), wildcards, files["input"], files["output"]))
    return jobs


def dry_run(configfile: str, snakefile: str = "Snakefile", target: str = "all") -> tuple[list[Job], float]:
    """Every job of ``target`` for ``configfile`` (a dry run in an empty working directory, so nothing is done yet)
    and the dry run's wall time (Snakemake's start, the config's validation and the DAG)."""
    with tempfile.TemporaryDirectory(prefix="ifcl-plan-") as tmp:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(Path(snakefile).resolve()), "-d", tmp, target, "-n",
               "--configfile", str(Path(configfile).resolve())]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"the dry run of {configfile} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return parse_dry_run(proc.stdout + proc.stderr), seconds


def submissions(jobs: list[Job], kinds: dict[str, str], mode: str) -> tuple[int, int]:
    """(SLURM submissions, submissions along the longest chain that must run one after another) under
    ``job_groups: mode``: each group's connected jobs are one submission, every other non-local job one."""
    producer = {out: i for i, job in enumerate(jobs) for out in job.outputs}
    deps = [{producer[f] for f in job.inputs if f in producer} for job in jobs]
    group = []
    for job in jobs:
        kind = kinds.get(job.rule, "job")
        pattern = group_pattern(mode, kind == "grouped") if kind.startswith("grouped") else None
        group.append(pattern.format(**job.wildcards) if pattern else None)
    # each job's submission: its group's connected component (union-find over same-group dependencies), or itself
    unit = list(range(len(jobs)))

    def find(i):
        while unit[i] != i:
            unit[i] = unit[unit[i]]
            i = unit[i]
        return i

    for i, ds in enumerate(deps):
        for d in ds:
            if group[i] is not None and group[i] == group[d]:
                unit[find(i)] = find(d)
    local = [kinds.get(job.rule) == "local" or not job.outputs for job in jobs]  # target rules (all) run here
    # the graph of submissions (a local job is a node of its own that submits nothing), acyclic: Snakemake refuses a
    # group that a path leaves and enters again
    node = [("job", i) if local[i] else ("unit", find(i)) for i in range(len(jobs))]
    before = defaultdict(set)
    for i, ds in enumerate(deps):
        before[node[i]].update(node[d] for d in ds if node[d] != node[i])
    after = defaultdict(set)
    for n, ds in before.items():
        for d in ds:
            after[d].add(n)
    nodes = set(node)
    waiting = {n: len(before[n]) for n in nodes}
    ready = [n for n in nodes if waiting[n] == 0]
    chain = {}
    while ready:  # Kahn's order: a node after everything it depends on
        n = ready.pop()
        chain[n] = max((chain[d] for d in before[n]), default=0) + (n[0] == "unit")
        for m in after[n]:
            waiting[m] -= 1
            if waiting[m] == 0:
                ready.append(m)
    return len({n for n in nodes if n[0] == "unit"}), max(chain.values(), default=0)


def scale_report(configfiles: list[str], snakefile: str = "Snakefile", rules_dir: str = "workflow/rules") -> list[dict]:
    """For each config: jobs, local jobs, the dry run's seconds, and per grouping the submissions and the longest
    chain of them."""
    kinds = rule_kinds(Path(rules_dir))
    rows = []
    for configfile in configfiles:
        jobs, seconds = dry_run(configfile, snakefile)
        row = {"config": configfile, "jobs": len(jobs), "local_jobs": sum(kinds.get(j.rule) == "local" for j in jobs),
               "dry_run_s": round(seconds, 1)}
        for mode in MODES:
            row[f"submissions_{mode}"], row[f"chain_{mode}"] = submissions(jobs, kinds, mode)
        rows.append(row)
    return rows


def format_scale(rows: list[dict]) -> str:
    head = ("config", "jobs", "local", "dry run (s)", "submissions none/task/run", "longest chain none/task/run")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join([r["config"], str(r["jobs"]), str(r["local_jobs"]), f"{r['dry_run_s']:.1f}",
                                 "/".join(str(r[f"submissions_{m}"]) for m in MODES),
                                 "/".join(str(r[f"chain_{m}"]) for m in MODES)]))
    return "\n".join(lines)
