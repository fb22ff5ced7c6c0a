"""Watching runs: the jobs' log lines and status files (ifcl.progress) and `ifcl status` (ifcl.status), on a
fabricated half-finished working directory and on the session's tiny run. (`ifcl status` during a running pipeline:
tests/test_reproducibility.py, while a training job runs.)"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY_CONFIG
from ifcl import layout
from ifcl import progress
from ifcl.registry import task_files
from ifcl.config import load_config
from ifcl.status import console_line, status_report

EPOCH_LINE = re.compile(r"epoch \d+/\d+: loss [\d.]+, (train )?accuracy [\d.]+%, .*lr [\d.e-]+, [\d.]+ s, [\d.]+ img/s$")


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A job of rule train_task running in tmp_path, logging to its usual log file."""
    monkeypatch.chdir(tmp_path)
    log = Path("logs/train_task/tiny_inflora/seed0/task1.log")
    log.parent.mkdir(parents=True)
    progress.start_job("train_task", {"exp": "tiny_inflora", "seed": "0", "t": "1"}, log)
    yield Path("logs/.status/train_task/tiny_inflora/seed0/task1.json")
    progress._job = None


def test_a_job_records_its_epochs_position_and_end_in_its_status_file(job, monkeypatch, capsys):
    status = json.loads(job.read_text())
    assert status["state"] == "running" and status["job"] == "tiny_inflora/seed0/task1"
    assert status["log"] == "logs/train_task/tiny_inflora/seed0/task1.log"
    monkeypatch.setattr(progress, "STATUS_SECONDS", 0.0)
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)
    batches = [(list(range(8)), None)] * 4
    for epoch in range(2):
        for _ in progress.track(batches, f"train epoch {epoch + 1}/2", epoch=epoch, epochs=2):
            pass
        line = progress.epoch_done("train", epoch, 2, seconds=2.0, images=32, loss=1.5 - epoch, accuracy=50.0,
                                   lr=0.01)
        assert EPOCH_LINE.search(line), line
    out = capsys.readouterr().out
    assert "\r" not in out
    # a line per batch here (LINE_SECONDS = 0): position, speed and ETA; the ETA reaches 0 at the last batch
    assert re.search(r"^train epoch 1/2: 1/4 batches, [\d.]+ img/s, ETA \d+:\d\d$", out, flags=re.M), out
    assert "train epoch 2/2: 4/4 batches" in out and out.rstrip().endswith("16.0 img/s")
    status = json.loads(job.read_text())
    assert status["epoch"] == 2 and status["epochs"] == 2
    assert status["last_epoch"] == {"epoch": 2, "loss": 0.5, "accuracy": 50.0, "lr": 0.01}
    progress.finish_job(RuntimeError("CUDA out of memory"))
    status = json.loads(job.read_text())
    assert status["state"] == "failed" and status["error"] == "RuntimeError: CUDA out of memory"


def write_status(root: Path, rule: str, name: str, **fields) -> None:
    path = root / "logs/.status" / rule / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rule": rule, "job": name, "log": f"logs/{rule}/{name}.log", "host": "node7",
                                **fields}))


def test_status_of_a_half_finished_tree(tmp_path):
    config = load_config(TINY_CONFIG)
    spec = config["experiments"]["tiny_inflora"]
    for t in range(2):  # tasks 0 and 1 of tiny_inflora seed 0 done
        for name in task_files(spec, t):
            path = tmp_path / layout.task_file("tiny_inflora", 0, t, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
    for name in task_files(spec, 2)[:1]:  # task 2 begun: not done
        (tmp_path / layout.task_file("tiny_inflora", 0, 2, name)).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / layout.task_file("tiny_inflora", 0, 2, name)).write_text("x")
    now = 1_000_000.0
    write_status(tmp_path, "train_task", "tiny_inflora/seed0/task2", state="running", started=now - 125,
                 updated=now - 3, epoch=4, epochs=10, step=3, steps=9, images_per_s=412.5, eta_s=75,
                 last_epoch={"epoch": 3, "loss": 0.8123, "accuracy": 71.25, "lr": 0.01})
    write_status(tmp_path, "train_prefix", "tiny_diki/seed0/task0", state="running", started=now - 4000,
                 updated=now - 3600, epoch=1, epochs=2, slurm_job="4242")
    write_status(tmp_path, "evaluate_task", "tiny_seq-lora/seed1/task0", state="failed", started=now - 600,
                 updated=now - 590, error="FileCheckError: eval.json does not match its digest")
    write_status(tmp_path, "split_tasks", "tiny_seq-lora/seed0", state="done", started=now - 900, updated=now - 899)
    report = status_report(config, tmp_path, now=now)
    assert re.search(r"^  tiny_inflora +seed 0  2/3 tasks$", report, flags=re.M), report
    assert re.search(r"^  tiny_seq-lora +seed 1  0/3 tasks$", report, flags=re.M), report
    assert "0/10 runs finished, 2/24 tasks done" in report
    assert "running jobs: 2" in report
    assert ("train_task  tiny_inflora/seed0/task2  epoch 4/10  batch 3/9  (epoch 3: loss 0.8123, acc 71.2%)  "
            "412.5 img/s  ETA 1:15  running 2:05") in report
    assert "log: logs/train_task/tiny_inflora/seed0/task2.log  (node7)" in report
    assert "train_prefix  tiny_diki/seed0/task0  epoch 1/2  running 1:06:40  NO UPDATE FOR 1:00:00" in report
    assert "(node7, SLURM job 4242)" in report
    assert "last failure (9:50 ago; 1 failed job not redone since):" in report
    assert "evaluate_task tiny_seq-lora/seed1/task0: FileCheckError: eval.json does not match its digest" in report
    assert "log: logs/evaluate_task/tiny_seq-lora/seed1/task0.log" in report
    assert "split_tasks" not in report  # finished jobs are counted in the runs, not listed
    line = console_line(tmp_path, now=now)
    assert line.startswith("[ifcl] 2 running: train_prefix  tiny_diki/seed0/task0") and "ETA 1:15" in line


def test_ifcl_status_on_the_finished_tiny_run_and_its_logs_read_as_text(tiny_run, tmp_path):
    configfile = tmp_path / "tiny.yaml"
    configfile.write_text(yaml.safe_dump(TINY_CONFIG))
    proc = subprocess.run([sys.executable, "-m", "ifcl.cli", "status", "--configfile", str(configfile), "-d",
                           str(tiny_run)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "10/10 runs finished, 24/24 tasks done" in proc.stdout
    assert "running jobs: none" in proc.stdout and "no failed job" in proc.stdout
    logs = sorted((tiny_run / "logs").rglob("*.log"))
    assert logs and not [p for p in logs if "\r" in p.read_text()]
    statuses = sorted((tiny_run / "logs/.status").rglob("*.json"))
    assert len(statuses) == len(logs) and {json.loads(p.read_text())["state"] for p in statuses} == {"done"}
    train = (tiny_run / "logs/train_task/tiny_inflora/seed0/task1.log").read_text().splitlines()
    assert [line for line in train if EPOCH_LINE.search(line)], train
    prefix = (tiny_run / "logs/train_prefix/tiny_diki/seed0/task0.log").read_text().splitlines()
    assert len([line for line in prefix if re.search(r"task 0 epoch \d/2: loss .*val accuracy", line)]) == 2
