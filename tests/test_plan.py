"""Job groups and the submission counts of `ifcl bench scale` (ifcl.plan): the group of each grouping, which rules
of the workflow are grouped, and the submissions and longest chain of submissions of a small dry run worked out
by hand."""
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO
from ifcl.plan import Job, group_pattern, parse_dry_run, rule_kinds, submissions


def test_group_patterns():
    assert group_pattern("run") == group_pattern("run", per_task=False) == "run"
    assert group_pattern("task") == "task{t}" and group_pattern("task", per_task=False) == "run"
    assert group_pattern("none") is None
    with pytest.raises(ValueError):
        group_pattern("node")


def test_every_rule_of_a_run_is_grouped_and_nothing_shared_is():
    """A run's rules (their log names the run: logs/<rule>/{exp}/seed{seed}...) that are submitted belong to the run's
    group; shared ones (data, backbones, frozen features) and local rules do not."""
    kinds = rule_kinds(REPO / "workflow/rules")
    text = "\n".join(p.read_text() for p in (REPO / "workflow/rules").glob("*.smk"))
    logs = {name: re.search(r'\n    log:\n\s+"([^"]+)"', body).group(1)
            for name, body in re.findall(r"\nrule (\w+):(.*?)(?=\nrule |\Z)", text, re.S) if "\n    log:" in body}
    for rule, log in logs.items():
        per_run = "{exp}/seed{seed}" in log
        if kinds[rule] == "local":
            continue
        assert kinds[rule].startswith("grouped") == per_run, (rule, kinds[rule], log)
        assert (kinds[rule] == "grouped") == (per_run and "{t}" in log), rule
    assert kinds["train_task"] == "grouped" and kinds["frozen_features"] == "job" and kinds["split_tasks"] == "local"


def job_block(rule, inputs, outputs, **wildcards):
    lines = [f"rule {rule}:"]
    if inputs:
        lines.append(f"    input: {', '.join(inputs)}")
    if outputs:
        lines.append(f"    output: {', '.join(outputs)}")
    lines.append("    jobid: 1")
    if wildcards:
        lines.append(f"    wildcards: {', '.join(f'{k}={v}' for k, v in wildcards.items())}")
    return "\n".join(lines) + "\n"


def small_dry_run() -> str:
    """Data (a job), then per run (2 runs) a local split and 2 tasks of reduction -> train -> evaluate, reduction
    t1 after train t0."""
    text = "Building DAG of jobs...\n" + job_block("generate_dataset", [], ["data/d.csv"], dataset="d")
    for exp in ("a", "b"):
        run = dict(exp=exp, seed=0)
        text += job_block("split_tasks", ["data/d.csv"], [f"{exp}/tasks.json"], **run)
        for t in (0, 1):
            before = [f"{exp}/t0/adapter"] if t else []
            text += job_block("reduction", [f"{exp}/tasks.json", *before], [f"{exp}/t{t}/reduction"], **run, t=t)
            text += job_block("train_task", [f"{exp}/t{t}/reduction", *before], [f"{exp}/t{t}/adapter"], **run, t=t)
            text += job_block("evaluate_task", [f"{exp}/t{t}/adapter"], [f"{exp}/t{t}/eval"], **run, t=t)
    return text + job_block("all", [f"{e}/t1/eval" for e in "ab"], [])


def test_submissions_and_longest_chain_worked_out_by_hand():
    jobs = parse_dry_run(small_dry_run())
    assert len(jobs) == 16
    assert jobs[1] == Job("split_tasks", {"exp": "a", "seed": "0"}, ["data/d.csv"], ["a/tasks.json"])
    kinds = rule_kinds(REPO / "workflow/rules")
    # none: the data job and 6 jobs a run; the chain data -> reduction 0 -> train 0 -> reduction 1 -> train 1 ->
    # evaluate 1 (the local split and `all` submit nothing)
    assert submissions(jobs, kinds, "none") == (13, 6)
    # task: the data job and one submission per task of each run; data -> task 0 -> task 1
    assert submissions(jobs, kinds, "task") == (5, 3)
    # run: the data job and one submission per run
    assert submissions(jobs, kinds, "run") == (3, 2)


def test_bench_scale_counts_the_demo(tmp_path):
    """`ifcl bench scale` on the demo: a dry run's jobs, and fewer submissions and a shorter chain per run than per
    task than per job."""
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "-m", "ifcl.cli", "bench", "scale", "--configfile", "config/demo.yaml",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["config"] == "config/demo.yaml" and row["jobs"] > row["local_jobs"] > 0
    assert row["submissions_none"] > row["submissions_task"] > row["submissions_run"] >= 14  # 14 runs
    assert row["chain_none"] > row["chain_task"] > row["chain_run"] > 0
    assert "config/demo.yaml | " in proc.stdout
