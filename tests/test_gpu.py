"""GPU leasing (ifcl.gpu) with fake device ids: concurrent jobs under `--resources gpu=N` each get their own device,
a killed holder frees its device at once, an inherited device list is respected (one device used as it is, one of
several leased), no GPU means CPU."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

HOLD = """
import os, sys, time
from pathlib import Path
from ifcl.gpu import claim_device
print("RESULT", claim_device(), os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
while not Path(sys.argv[1]).exists():
    time.sleep(0.05)
"""


def env(tmp_path: Path, devices: str | None = "0,1,2", **extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "IFCL_GPUS")}
    e.update(IFCL_GPU_LOCK_DIR=str(tmp_path / "locks"), PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1", **extra)
    if devices is not None:
        e["IFCL_GPUS"] = devices
    return e


def result(proc: subprocess.Popen) -> tuple[list[str], list[str]]:
    """(what claim_device answered and the visible devices, the log lines printed before)."""
    log = []
    while not (line := proc.stdout.readline()).startswith("RESULT"):
        assert line, "the process ended without an answer:\n" + "".join(log)
        log.append(line)
    return line.split()[1:], log


def holder(tmp_path: Path, environment: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "stop")], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_holders_get_distinct_devices_and_a_killed_holder_frees_its_device(tmp_path):
    e = env(tmp_path)
    holders = [holder(tmp_path, e) for _ in range(3)]
    try:
        leased = [result(h)[0] for h in holders]
        assert all(answer == "cuda" for answer, _ in leased)
        assert sorted(device for _, device in leased) == ["0", "1", "2"]

        holders.append(holder(tmp_path, e))  # a fourth job: every device is held
        time.sleep(1.5)
        assert holders[-1].poll() is None
        victim = next(i for i, (_, device) in enumerate(leased) if device == "1")
        os.kill(holders[victim].pid, signal.SIGKILL)
        answer, log = result(holders[-1])
        assert answer == ["cuda", "1"] and "all GPUs ['0', '1', '2'] are leased" in "".join(log)
    finally:
        (tmp_path / "stop").touch()
        for h in holders:
            h.wait(timeout=30)


def test_an_inherited_device_list_is_respected_and_no_gpu_means_cpu(tmp_path):
    e = env(tmp_path, CUDA_VISIBLE_DEVICES="3")  # as SLURM sets it
    (tmp_path / "stop").touch()
    out = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path / "stop")], env=e, capture_output=True, text=True)
    assert out.stdout.split()[-3:] == ["RESULT", "cuda", "3"] and "inherited" in out.stdout
    assert not (tmp_path / "locks").exists()  # nothing leased
    out = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path / "stop")], env=env(tmp_path, devices=""),
                         capture_output=True, text=True)
    assert "no GPU on this machine: running on CPU" in out.stdout and out.stdout.split()[-3:] == ["RESULT", "cpu", "None"]


def test_jobs_given_several_devices_lease_one_each(tmp_path):
    """A cluster job that runs several jobs at once (`--group-components`) inherits its allocation's devices: each
    job leases one of them, never another."""
    e = env(tmp_path, devices=None, CUDA_VISIBLE_DEVICES="4,6")
    holders = [holder(tmp_path, e) for _ in range(2)]
    try:
        assert sorted(result(h)[0][1] for h in holders) == ["4", "6"]
    finally:
        (tmp_path / "stop").touch()
        for h in holders:
            h.wait(timeout=30)


SNAKEFILE = """
rule all:
    input: expand("job{i}.json", i=range(6))

rule job:
    output: "job{i}.json"
    resources: gpu=1
    shell: "{python} {script} {output}"
"""

JOB = """
import json, os, sys, time
from ifcl.gpu import claim_device
claim_device()
start = time.time()
time.sleep(1.0)
json.dump({"device": os.environ["CUDA_VISIBLE_DEVICES"], "start": start, "end": time.time()}, open(sys.argv[1], "w"))
"""


def test_concurrent_snakemake_jobs_under_resources_gpu_n_never_share_a_device(tmp_path):
    (tmp_path / "job.py").write_text(JOB)
    (tmp_path / "Snakefile").write_text(SNAKEFILE.replace("{python}", sys.executable)
                                        .replace("{script}", str(tmp_path / "job.py")))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "6", "--resources", "gpu=3"], cwd=tmp_path,
                          env=env(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [json.loads((tmp_path / f"job{i}.json").read_text()) for i in range(6)]
    assert {j["device"] for j in jobs} <= {"0", "1", "2"}
    overlapping = [(a, b) for i, a in enumerate(jobs) for b in jobs[i + 1:]
                   if a["start"] < b["end"] and b["start"] < a["end"]]
    assert overlapping  # jobs did run at the same time
    assert all(a["device"] != b["device"] for a, b in overlapping)
