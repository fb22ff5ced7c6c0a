"""The ``ifcl`` command.

    ifcl bench demo [--cores 2] [--out results/bench/demo.json]
        Run the offline demo from scratch in a temporary working directory; report its wall time, the number of
        jobs per rule and the demo's summary table, and write them as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .files import write_json


def job_stats(log: str) -> dict[str, int]:
    """The first "Job stats" table of a Snakemake log: jobs per rule."""
    jobs: dict[str, int] = {}
    lines = log.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Job stats:"), None)
    if start is None:
        return jobs
    for line in lines[start + 3 :]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        jobs[parts[0]] = int(parts[1])
    return jobs


def bench_demo(args) -> dict:
    snakefile = Path(args.snakefile).resolve()
    if not snakefile.is_file():
        sys.exit(f"ifcl bench demo: no Snakefile at {snakefile} (run from the repository root or pass --snakefile)")
    configfile = Path(args.configfile).resolve()
    with tempfile.TemporaryDirectory(prefix="ifcl-bench-") as tmp:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", tmp, "--cores", str(args.cores),
               "--configfile", str(configfile)]
        print("running:", " ".join(cmd), flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"the demo failed:\n{proc.stderr[-6000:]}")
        jobs = job_stats(proc.stderr + proc.stdout)
        summary = Path(tmp, "results", "summary", "summary.md").read_text()
    report = {
        "wall_seconds": round(wall, 1),
        "cores": args.cores,
        "config": str(Path(args.configfile)),
        "jobs_per_rule": dict(sorted(jobs.items())),
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "summary_md": summary,
    }
    print(f"demo wall time: {wall:.1f} s on {args.cores} cores ({sum(jobs.values())} jobs)")
    print(summary)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ifcl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    demo = bench_sub.add_parser("demo", help="wall time of the whole offline demo, from scratch")
    demo.add_argument("--cores", type=int, default=2)
    demo.add_argument("--snakefile", default="Snakefile")
    demo.add_argument("--configfile", default="config/demo.yaml")
    demo.add_argument("--out", default="results/bench/demo.json")
    args = parser.parse_args(argv)
    if args.command == "bench" and args.what == "demo":
        report = bench_demo(args)
        write_json(args.out, report)
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
