"""Epoch checkpoints (ifcl.checkpoint) in the training loop: a loop stopped by SIGTERM or SIGINT writes the last
finished epoch's state, and a fresh process that builds the same model and loader continues from it to the same
bytes as a loop that was never stopped. Every random draw of the loop here comes from a different generator
(torch's, NumPy's, Python's, the loader's) so that one left unrestored changes the result."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import torch.nn as nn
from torch.utils.data import Dataset

from conftest import REPO, TINY_CONFIG, copy_run, only, snakemake, tree
from ifcl import checkpoint
from ifcl.data.loader import make_loader
from ifcl.runlog import Terminated
from ifcl.state import save_state
from ifcl.training import train_classifier

CFG = {"optimizer": "adam", "lr": 0.05, "weight_decay": 0.0, "epochs": 4, "schedule": "cosine"}


class Noisy(Dataset):
    """Augmentations from torch's, NumPy's and Python's global generators."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(20, 4, generator=g), torch.arange(20) % 3

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return self.x[i] + 0.3 * torch.randn(4) + float(np.random.rand()) - random.random(), self.y[i]


class Model(nn.Module):
    """A linear classifier with a moving average of its weight updated after every step (a buffer, as LAE's
    offline adapters are state the optimiser does not hold)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("ema", self.fc.weight.detach().clone())

    def end_step(self):
        with torch.no_grad():
            self.ema.mul_(0.9).add_(0.1 * self.fc.weight)


def run(stop_at: int | None = None, signum: int = signal.SIGTERM, state: str = "module"):
    """A fresh process's job: seeds, model and loader built from scratch, then the training loop; ``stop_at``: the
    optimiser step after which the process receives ``signum``."""
    if checkpoint._job is not None:
        checkpoint._job.loops = 0  # a new process: its first training loop
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    model = Model()
    loader = make_loader(Noisy(), batch_size=6, shuffle=True, seed=3)
    steps = []

    def end_step():
        model.end_step()
        steps.append(1)
        if len(steps) == stop_at:
            os.kill(os.getpid(), signum)

    rows = train_classifier(list(model.parameters()), model.fc, loader, CFG, on_step=end_step,
                            state=model if state == "module" else None)
    return rows, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def job(tmp_path):
    """A workflow job's checkpoint (what ifcl.runlog.job sets up), its SIGTERM handler and Python's SIGINT handler (a
    pytest-xdist worker ignores SIGINT)."""
    def terminated(signum, frame):
        raise Terminated("stopped by signal SIGTERM")

    previous = signal.signal(signal.SIGTERM, terminated), signal.signal(signal.SIGINT, signal.default_int_handler)
    checkpoint._job = checkpoint.JobCheckpoint(tmp_path / "checkpoints/train_task/x/seed0/task0.safetensors",
                                               "settings-1")
    yield checkpoint._job
    checkpoint._job = None
    signal.signal(signal.SIGTERM, previous[0])
    signal.signal(signal.SIGINT, previous[1])


def same(a, b):
    return a[0] == b[0] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_loop_continues_from_its_last_epoch_to_the_same_bytes(job, signum, capsys):
    reference = run()
    assert len(reference[0]) == 4
    stopped = (Terminated, KeyboardInterrupt)
    with pytest.raises(stopped):
        run(stop_at=9, signum=signum)  # 4 steps an epoch (20 images, batches of 6): stopped in epoch 3
    assert job.path.exists() and "after epoch 2" in job.written
    resumed = run()
    assert "resumed from the epoch checkpoint" in capsys.readouterr().out
    assert same(resumed, reference)


def test_a_loop_stopped_in_its_first_epoch_starts_again(job):
    reference = run()
    with pytest.raises(Terminated):
        run(stop_at=2)
    assert not job.path.exists()
    assert same(run(), reference)


def test_state_the_optimiser_does_not_hold_must_be_in_the_checkpoint(job):
    """Resumed with the parameters alone, the moving average restarts from the last epoch's weights: other bytes
    (the test above can fail)."""
    reference = run()
    with pytest.raises(Terminated):
        run(stop_at=9, state="params")
    assert not same(run(state="params"), reference)


@pytest.mark.parametrize("damage", ["other settings", "corrupt", "truncated"])
def test_a_checkpoint_of_other_settings_or_damaged_is_removed_and_the_task_starts_again(job, damage, capsys):
    reference = run()
    with pytest.raises(Terminated):
        run(stop_at=9)
    if damage == "other settings":
        job.fingerprint = "settings-2"
    else:
        raw = bytearray(job.path.read_bytes())
        raw[len(raw) // 2] ^= 1
        job.path.write_bytes(bytes(raw) if damage == "corrupt" else bytes(raw[:100]))
    assert same(run(), reference)
    out = capsys.readouterr().out
    assert "is not used" in out and "resumed" not in out and not job.path.exists()


def test_outside_a_job_nothing_is_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint._job = None
    assert same(run(), run())
    assert not (tmp_path / "checkpoints").exists()


def test_the_fingerprint_changes_with_params_and_inputs(tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("a")
    base = checkpoint.fingerprint("train_task", {"t": "1"}, {"train": {"lr": 0.1}}, [str(f)])
    assert checkpoint.fingerprint("train_task", {"t": "1"}, {"train": {"lr": 0.1}}, [str(f)]) == base
    assert checkpoint.fingerprint("train_task", {"t": "1"}, {"train": {"lr": 0.2}}, [str(f)]) != base
    assert checkpoint.fingerprint("train_task", {"t": "2"}, {"train": {"lr": 0.1}}, [str(f)]) != base
    os.utime(f, ns=(1, 1))  # a file without a recorded digest: its size and modification time
    assert checkpoint.fingerprint("train_task", {"t": "1"}, {"train": {"lr": 0.1}}, [str(f)]) != base
    state = tmp_path / "adapter.safetensors"  # a state file: its content, not its time
    save_state(state, {"w": torch.ones(2)}, {"kind": "adapter"})
    with_state = checkpoint.fingerprint("train_task", {"t": "1"}, {}, [str(state)])
    os.utime(state, ns=(1, 1))
    assert checkpoint.fingerprint("train_task", {"t": "1"}, {}, [str(state)]) == with_state
    save_state(state, {"w": torch.zeros(2)}, {"kind": "adapter"})
    assert checkpoint.fingerprint("train_task", {"t": "1"}, {}, [str(state)]) != with_state
    assert checkpoint.path_for("logs/train_task/x/seed0/task3.log") == Path(
        "checkpoints/train_task/x/seed0/task3.safetensors")


# ---- the workflow, stopped locally ----

STOPPED_TASK = "results/runs/tiny_seq-lora/seed0/task0"
STOPPED_LOG = "logs/train_task/tiny_seq-lora/seed0/task0.log"


def long_first_task() -> dict:
    """The tiny seq-lora run with a first task of 40 epochs: long enough to be stopped in the middle."""
    config = only(TINY_CONFIG, "tiny_seq-lora")
    config["experiments"]["tiny_seq-lora"]["task_overrides"] = {0: {"epochs": 40}}
    return config


@pytest.mark.pipeline
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_workflow_stopped_during_training_continues_from_the_checkpoint(how, copy_of_tiny_run, tmp_path):
    """A local `snakemake` while a task trains. Ctrl-C (SIGINT to its process group): Snakemake stops, the job writes
    its checkpoint, and the next `snakemake` continues from it. SIGTERM to the training job (what a cluster's
    preemption does): the job writes its checkpoint and fails, and Snakemake's retry continues from it. Either way,
    to the bytes of a run that was never stopped."""
    config = long_first_task()
    target = [f"{STOPPED_TASK}/adapter.safetensors", f"{STOPPED_TASK}/train_log.csv"]
    reference = copy_run(copy_of_tiny_run, tmp_path / "reference")
    snakemake(reference, config, *target)
    work = copy_of_tiny_run
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work), *target, "--cores", "2",
           "--retries", "0" if how == "ctrl-c" else "1", "--configfile", str(work / "config.yaml")]
    with open(tmp_path / "stopped.out", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log, began = work / STOPPED_LOG, time.monotonic()
    while not (log.exists() and "epoch 5/40" in log.read_text()):
        assert proc.poll() is None and time.monotonic() - began < 120, (tmp_path / "stopped.out").read_text()[-3000:]
        time.sleep(0.02)
    saved = work / "checkpoints/train_task/tiny_seq-lora/seed0/task0.safetensors"
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) != 0
        assert saved.exists(), log.read_text()[-3000:]
        assert not (work / target[0]).exists()
        snakemake(work, config, *target)
    else:
        status = json.loads((work / "logs/.status" / Path(STOPPED_LOG).relative_to("logs").with_suffix(".json"))
                            .read_text())
        os.kill(status["pid"], signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "stopped.out").read_text()[-3000:]
        assert "Trying to restart job" in (tmp_path / "stopped.out").read_text()
    text = log.read_text()
    assert re.search(r"stopped; epoch checkpoint written to checkpoints/train_task/tiny_seq-lora/seed0/"
                     r"task0.safetensors after epoch \d+", text), text[-3000:]
    assert "resumed from the epoch checkpoint" in text
    assert not saved.exists()
    assert tree(work, STOPPED_TASK) == tree(reference, STOPPED_TASK)
