"""The workflow through `--profile profiles/slurm` on a real single-node SLURM cluster started here
(tests/slurm_cluster.py): every run is one SLURM submission (its job group) and every other job other than the local
rules one of its own; a submission asks for one GPU and the sum of its jobs' runtimes; every job gets its rule's
threads as CPUs, GPU jobs get their device from SLURM; a training job stopped with `scancel --signal=TERM` writes its
epoch checkpoint, is submitted again and continues from it; and the results equal a local run's byte for byte.
Skipped, saying why, without root or without Debian's slurm-wlm and munge packages (.ci/run installs them).

The config runs `all` (runs, summary, figures) and has every kind of rule the demo has (the test checks it against
the demo's DAG): generated data, both backbones' pretraining, InfLoRA+CA (2 tasks: designed subspaces, training,
memory, class statistics, alignment, evaluation), DIKI (frozen features, Gaussians, prefixes, calibrated
evaluation), the aggregation, the summary and every figure rule. It runs from scratch on the cluster, and from
scratch locally beside it, in the cluster's idle time (locally, jobs are forked from the step server, so the
comparison also shows that a served job computes what a job in a process of its own does). The node has this
machine's 2 cores and two fake GPUs, so two one-thread jobs run at a time, as they do locally.

The whole demo runs the same way under the `demo` marker (`pytest -m demo`), from scratch, locally and then on the
cluster (without the stop)."""
import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_CONFIG, only, tree
from ifcl.config import load_config
from ifcl.plan import dry_run, rule_kinds, submissions
from ifcl.status import status_report
from slurm_cluster import missing_requirements, single_node_cluster

pytestmark = pytest.mark.pipeline
TARGETS = ["all"]
# The test cluster has no accounting database: the plugin must poll with squeue (docs/running.md).
# After a poll that finds a job finished, the next comes after --slurm-init-seconds-before-status-checks; after one
# that finds none, 10 s later than the last interval. A job of the tiny run takes 9 to 14 s on its node (2 cores,
# the local run beside it: slurmctld.log, allocation to completion), so a first poll after 15 s finds it done; one
# after 8 s found none and the next came 18 s later.
CLUSTER_FLAGS = ["--slurm-status-command", "squeue", "--seconds-between-status-checks", "15",
                 "--slurm-init-seconds-before-status-checks", "15"]


STOPPED = "logs/train_task/slurm_inflora-ca/seed0/task0.log"  # the training job the test stops on the cluster


def tiny_slurm_config() -> dict:
    """The session's tiny DIKI run and a 2-task InfLoRA+CA run: the shortest chain with every InfLoRA rule; its
    first task trains for 30 epochs, long enough to be stopped in the middle."""
    config = only(TINY_CONFIG, "tiny_diki")
    config["experiments"]["slurm_inflora-ca"] = {**copy.deepcopy(TINY_CONFIG["experiments"]["tiny_inflora-ca"]),
                                                 "num_tasks": 2}
    config["experiments"]["slurm_inflora-ca"]["task_overrides"] = {0: {"epochs": 30}}
    return config


def stop_training_once(workdir: Path, env: dict, config: dict, timeout: float = 600) -> tuple[str, str]:
    """Wait until the stopped job's log shows its 5th epoch done, then `scancel --signal=TERM` its SLURM job (as
    preemption or a time limit does); the SLURM job id, and what `ifcl status` said just before."""
    log, began = workdir / STOPPED, time.monotonic()
    while not (log.exists() and "epoch 5/30" in log.read_text()):
        assert time.monotonic() - began < timeout, f"{STOPPED} did not reach its 5th epoch in {timeout} s"
        time.sleep(0.05)
    slurm_id = re.match(r"SLURM job (\d+) on ", log.read_text()).group(1)
    status = status_report(config, workdir)
    subprocess.run(["scancel", "--signal=TERM", slurm_id], env=env, check=True)
    return slurm_id, status


def local_rules() -> set[str]:
    """The rules declared `localrule: True` in workflow/rules (they run where Snakemake runs, not in SLURM)."""
    chunks = "\n".join(p.read_text() for p in (REPO / "workflow/rules").glob("*.smk")).split("\nrule ")
    return {chunk.split(":", 1)[0].strip() for chunk in chunks[1:] if "\n    localrule: True" in chunk}


def demo_rules(workdir: Path) -> set[str]:
    """The rules the demo's DAG has (a dry run of config/demo.yaml in ``workdir``, nothing run)."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "-n",
                           "--quiet", "rules", "--configfile", str(REPO / "config/demo.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(re.findall(r"^(\w+)\s+\d+$", proc.stdout + proc.stderr, re.M)) - {"all", "total"}


def start_snakemake(workdir: Path, env: dict, config: Path, *args: str) -> subprocess.Popen:
    """`snakemake all` in ``workdir``, its output going to <workdir>.out (a pipe nobody reads could fill up)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *TARGETS, *args,
           "--configfile", str(config)]
    with open(workdir.with_suffix(".out"), "w") as out:
        return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen) -> str:
    """The output of a Snakemake run started by start_snakemake, once it has succeeded."""
    proc.wait()
    out = Path(proc.args[proc.args.index("-d") + 1]).with_suffix(".out").read_text()
    assert proc.returncode == 0, out[-8000:]
    return out


@pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements()))
@pytest.mark.parametrize("case", ["tiny", pytest.param("demo", marks=pytest.mark.demo)])
def test_the_workflow_runs_through_the_slurm_profile_with_one_slurm_job_per_step(case, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    cluster.mkdir()
    local.mkdir()
    if case == "demo":
        config_file = REPO / "config/demo.yaml"
    else:
        config_file = tmp_path / "config.yaml"
        config_file.write_text(yaml.safe_dump(tiny_slurm_config(), sort_keys=False))
    local_run = start_snakemake(local, env, config_file, "--cores", "2")
    if case == "demo":  # the demo keeps both cores busy: its local run first, the cluster's after it
        finish(local_run)
    # A job asks for its rule's threads (1 or 2) as CPUs, a group for those of the jobs that may run at once (DIKI's
    # training beside its two Gaussians: 3), so the node claims 3 CPUs (its 2 real cores are oversubscribed by one
    # thread at most); it claims the memory profiles/slurm asks for.
    try:
        with single_node_cluster(tmp_path / "slurm", cpus=3, memory_mb=256000, gpus=2) as slurm_env:
            path = os.pathsep.join([slurm_env["PATH"], str(Path(sys.executable).parent)])
            cluster_env = {**env, **slurm_env, "PATH": path}
            run = start_snakemake(cluster, cluster_env, config_file, "--profile", str(REPO / "profiles/slurm"),
                                  "--verbose", *CLUSTER_FLAGS)
            stopped, status = (stop_training_once(cluster, cluster_env, load_config(config_file, REPO))
                               if case == "tiny" else (None, None))
            log = finish(run)
    finally:
        finish(local_run)

    # one SLURM submission per run (its job group; once more for the run whose training was stopped), one per
    # other non-local job; each submission's id at the top of its jobs' rule logs
    submitted = re.findall(r"Job (\S+) has been submitted with SLURM jobid (\d+) \(log: \S+/logs/slurm/(\w+?)_", log)
    slurm_ids = [slurm for _, slurm, _ in submitted]
    assert submitted and len(set(slurm_ids)) == len(slurm_ids)
    groups = [slurm for _, slurm, kind in submitted if kind == "group"]
    runs = [(exp, seed) for exp, spec in load_config(config_file, REPO)["experiments"].items()
            for seed in spec["seeds"]]
    assert len(groups) == len(runs) + (stopped is not None)
    jobs, _ = dry_run(str(config_file), str(REPO / "Snakefile"))  # what `ifcl bench scale` counts
    assert len(submitted) == submissions(jobs, rule_kinds(REPO / "workflow/rules"), "run")[0] + (stopped is not None)
    rule_logs = [p for p in (cluster / "logs").rglob("*.log") if "slurm" not in p.parts]
    first_lines = {p: p.read_text().splitlines()[0] if p.read_text() else "" for p in rule_logs}
    on_slurm = {p: m.group(1) for p, line in first_lines.items() if (m := re.match(r"SLURM job (\d+) on ", line))}
    assert set(on_slurm.values()) == set(slurm_ids) - {stopped}  # the stopped submission's jobs all ran again
    for exp, seed in runs:  # every job of a run in its run's submissions
        ids = {v for p, v in on_slurm.items() if f"/{exp}/seed{seed}/" in p.as_posix()}
        assert ids and ids <= set(groups) and len(ids) <= (2 if stopped and exp in STOPPED else 1), (exp, ids)
    ran_here = {p.relative_to(cluster / "logs").parts[0].removesuffix(".log") for p in rule_logs if p not in on_slurm}
    assert ran_here <= local_rules() and {"split_tasks", "aggregate_run", "summarize"} <= ran_here
    # every kind of rule the demo has ran: on the cluster, or here for the local rules
    assert {p.relative_to(cluster / "logs").parts[0].removesuffix(".log") for p in rule_logs} >= demo_rules(
        tmp_path / "dry-run")
    # a job submitted alone was given its rule's threads as CPUs (2 for the pretraining); a run's jobs share their
    # submission's job step (each job still runs its rule's threads)
    cpus = {p.relative_to(cluster / "logs").parts[0]: int(first_lines[p].rsplit("(", 1)[1].split()[0])
            for p in on_slurm}
    assert cpus["pretrain_backbone"] == cpus["pretrain_clip"] == 2 and cpus["frozen_features"] == 1
    assert cpus["train_task"] >= 1 and cpus["train_prefix"] >= 1
    trained = [p for p in on_slurm if p.parts[-4] in ("train_task", "train_prefix")]
    assert trained and all("GPU: using the inherited CUDA_VISIBLE_DEVICES" in p.read_text() for p in trained)
    # a run's submission asks for one GPU, not one per job (its GPU jobs run one at a time), and for a time limit
    # that adds its jobs' runtimes up: at least those of its GPU jobs, at most those of all of them
    budget = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    gpu_rules = set(re.findall(r"^rule (\w+):(?:(?!^rule ).)*?gpu=1", "\n".join(
        f.read_text() for f in (REPO / "workflow/rules").glob("*.smk")), re.M | re.S))
    group_calls = re.findall(r"sbatch call: (sbatch .*--comment '?rule_run_.*)", log)
    assert len(group_calls) == len(groups)
    for call in group_calls:
        jobs = re.findall(r"(\w+):exp=", call.split("--target-jobs", 1)[1].split(" --", 1)[0])
        minutes = [budget["set-resources"].get(rule, {}).get("runtime", budget["default-resources"]["runtime"])
                   for rule in jobs]
        limit = int(re.search(r" -t '?(\d+)", call).group(1))
        assert " --gpus=1 " in call and "--gpus=2" not in call, call
        assert sum(m for m, rule in zip(minutes, jobs) if rule in gpu_rules) <= limit <= sum(minutes), (limit, jobs)

    if stopped:  # the stopped job wrote its checkpoint, was submitted again, continued from it and removed it
        text = (cluster / STOPPED).read_text()
        assert re.search(r"stopped; epoch checkpoint written to checkpoints/train_task/slurm_inflora-ca/seed0/"
                         r"task0.safetensors after epoch \d+", text), text[-3000:]
        assert "resumed from the epoch checkpoint" in text
        assert f"SLURM job {stopped} on " in text and stopped in groups[:-1]
        # `ifcl status` showed the grouped training job like any other, with its submission's SLURM job
        assert re.search(rf"train_task\s+slurm_inflora-ca/seed0/task0\s.*\n\s+log: {STOPPED}\s.*SLURM job {stopped}\)",
                         status), status
        assert not (cluster / "checkpoints/train_task/slurm_inflora-ca/seed0/task0.safetensors").exists()

    # every run, backbone, feature cache, summary and figure file, byte for byte
    assert tree(cluster / "results") == tree(local / "results")
    assert (cluster / "results/summary/summary.csv").exists() and (cluster / "results/figures").exists()
    final = status_report(load_config(config_file, REPO), cluster)
    assert f"{len(runs)}/{len(runs)} runs finished" in final and "no failed job" in final, final


@pytest.mark.long
@pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements()))
def test_several_runs_share_one_submission_each_job_on_a_gpu_of_its_own(tmp_path):
    """`--group-components run=2 --resources gpu=2`: the tiny config's two runs are one submission of two GPUs, whose
    GPU jobs run two at a time, each on one of them (leased from the two SLURM gave the job), with the bytes of a
    local run. Not run by default (about 2 minutes): `pytest -m long`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    config = tiny_slurm_config()
    config["experiments"]["slurm_inflora-ca"]["task_overrides"] = {}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    local.mkdir()
    cluster.mkdir()
    local_run = start_snakemake(local, env, config_file, "--cores", "2")
    try:
        with single_node_cluster(tmp_path / "slurm", cpus=4, memory_mb=256000, gpus=2) as slurm_env:
            path = os.pathsep.join([slurm_env["PATH"], str(Path(sys.executable).parent)])
            log = finish(start_snakemake(cluster, {**env, **slurm_env, "PATH": path}, config_file,
                                         "--profile", str(REPO / "profiles/slurm"), "--verbose", *CLUSTER_FLAGS,
                                         "--group-components", "run=2", "--resources", "gpu=2"))
    finally:
        finish(local_run)
    groups = re.findall(r"sbatch call: (sbatch .*--comment '?rule_run_.*)", log)
    assert len(groups) == 1 and " --gpus=2 " in groups[0] + " "
    gpu_logs = [p.read_text() for rule in ("train_task", "train_prefix")
                for p in (cluster / "logs" / rule).rglob("*.log")]
    leased = [re.search(r"GPU: leased device (\d) of the inherited CUDA_VISIBLE_DEVICES='0,1'", text)
              for text in gpu_logs]
    assert all(leased) and {m.group(1) for m in leased} == {"0", "1"}
    assert tree(cluster / "results") == tree(local / "results")
