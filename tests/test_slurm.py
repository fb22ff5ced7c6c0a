"""The demo through `--profile profiles/slurm` on a real single-node SLURM cluster started here (tests/slurm_cluster.py):
every job other than the local rules is a SLURM job with its own id, GPU jobs get their device from SLURM, and the
results equal a local run's. Skipped, saying why, without root or without Debian's slurm-wlm and munge packages
(.ci/run installs them).

The whole demo runs (`all`: ten runs, the summary and the figures), once locally and once on the cluster. The node
has this machine's 2 cores and two fake GPUs, so two one-thread jobs run at a time, as they do locally."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tree
from slurm_cluster import missing_requirements, single_node_cluster

pytestmark = pytest.mark.pipeline
TARGETS = ["all"]
# The test cluster has no accounting database: the plugin must poll with squeue (README: "Running on a cluster").
# Its jobs take seconds, so the status is polled often.
CLUSTER_FLAGS = ["--slurm-status-command", "squeue", "--seconds-between-status-checks", "5",
                 "--slurm-init-seconds-before-status-checks", "5"]


def local_rules() -> set[str]:
    """The rules declared `localrule: True` in workflow/rules (they run where Snakemake runs, not in SLURM)."""
    chunks = "\n".join(p.read_text() for p in (REPO / "workflow/rules").glob("*.smk")).split("\nrule ")
    return {chunk.split(":", 1)[0].strip() for chunk in chunks[1:] if "\n    localrule: True" in chunk}


def snakemake(workdir: Path, env: dict, *args: str) -> str:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *TARGETS, *args,
           "--configfile", str(REPO / "config/demo.yaml")]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements()))
def test_the_demo_runs_through_the_slurm_profile_with_one_slurm_job_per_step(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    local = tmp_path / "local"
    local.mkdir()
    snakemake(local, env, "--cores", "2")

    cluster = tmp_path / "cluster"
    cluster.mkdir()
    # Every job asks for its rule's threads (1 or 2) as CPUs, so the node's 2 real cores are never oversubscribed
    # (which slows torch's threads down many times over); it claims the memory profiles/slurm asks for.
    with single_node_cluster(tmp_path / "slurm", cpus=2, memory_mb=256000, gpus=2) as slurm_env:
        path = os.pathsep.join([slurm_env["PATH"], str(Path(sys.executable).parent)])
        log = snakemake(cluster, {**env, **slurm_env, "PATH": path}, "--profile", str(REPO / "profiles/slurm"),
                        *CLUSTER_FLAGS)

    # one SLURM job per non-local job, each with its own id, also written at the top of the job's rule log
    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log)
    slurm_ids = [slurm for _, slurm in submitted]
    assert submitted and len(set(slurm_ids)) == len(slurm_ids)
    rule_logs = [p for p in (cluster / "logs").rglob("*.log") if "slurm" not in p.parts]
    first_lines = {p: p.read_text().splitlines()[0] if p.read_text() else "" for p in rule_logs}
    on_slurm = {p: m.group(1) for p, line in first_lines.items() if (m := re.match(r"SLURM job (\d+) on ", line))}
    assert sorted(on_slurm.values()) == sorted(slurm_ids)
    ran_here = {p.relative_to(cluster / "logs").parts[0].removesuffix(".log") for p in rule_logs if p not in on_slurm}
    assert ran_here <= local_rules() and {"split_tasks", "aggregate_run", "summarize"} <= ran_here
    # every job was given its rule's threads as CPUs: 2 for the pretraining and data rules, 1 for the task steps
    cpus = {p.relative_to(cluster / "logs").parts[0]: int(first_lines[p].rsplit("(", 1)[1].split()[0]) for p in on_slurm}
    assert cpus["pretrain_backbone"] == cpus["pretrain_clip"] == 2 and cpus["train_task"] == cpus["train_prefix"] == 1
    trained = [p for p in on_slurm if p.parts[-4] in ("train_task", "train_prefix")]
    assert trained and all("GPU: using the inherited CUDA_VISIBLE_DEVICES" in p.read_text() for p in trained)

    # every run, backbone, feature cache, summary and figure file, byte for byte
    assert tree(cluster / "results") == tree(local / "results")
    assert (cluster / "results/summary/summary.csv").exists() and (cluster / "results/figures").exists()
