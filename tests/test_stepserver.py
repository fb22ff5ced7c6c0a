"""The step server (ifcl.stepserver): a job handed over runs its script in a forked child with the job's streams,
directory, environment and arguments, and exits with its status; a job killed takes its child with it; without a
server, or with IFCL_STEP_SERVER=off, the job runs in its own process. (That a served job computes what a job of
its own does: tests/test_slurm.py compares a served local run with a SLURM run byte for byte.)"""
import os
import signal
import subprocess
import sys
import time

import pytest

from ifcl import stepserver

SCRIPT = """
import os, sys, time
from ifcl.stepserver import hand_over
code = hand_over(sys.argv[0])
if code is not None:
    os._exit(code)
print("pid", os.getpid(), "cwd", os.getcwd(), "arg", sys.argv[1], "var", os.environ.get("MY_VAR"),
      "served", bool(os.environ.get("IFCL_STEP_SERVER_CHILD")), flush=True)
if sys.argv[1] == "sleep":
    open("child.pid", "w").write(str(os.getpid()))
    time.sleep(60)
sys.exit(3)
"""


@pytest.fixture
def server(monkeypatch):
    if not stepserver.available():
        pytest.skip("the step server runs on Linux only")
    for var in (stepserver.ENV, "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    running = stepserver.start()
    yield
    stepserver.stop(running)


def run(tmp_path, arg, **env):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    return subprocess.Popen([sys.executable, str(script), arg], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "MY_VAR": "x", **env})


def test_a_served_job_runs_in_a_child_of_the_server_with_the_jobs_streams_and_status(server, tmp_path):
    proc = run(tmp_path, "hello")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3
    words = out.split()
    assert words[words.index("cwd") + 1] == str(tmp_path) and words[words.index("arg") + 1] == "hello"
    assert words[words.index("var") + 1] == "x" and words[words.index("served") + 1] == "True"
    assert int(words[words.index("pid") + 1]) != proc.pid
    off = run(tmp_path, "hello", IFCL_STEP_SERVER="off")
    out, _ = off.communicate(timeout=120)
    assert off.returncode == 3 and "served False" in out and f"pid {off.pid} " in out


def test_a_killed_job_takes_its_child_with_it(server, tmp_path):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        (tmp_path / "child.pid").unlink(missing_ok=True)
        proc = run(tmp_path, "sleep")
        deadline = time.monotonic() + 120
        while not (tmp_path / "child.pid").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        child = int((tmp_path / "child.pid").read_text())
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z":
            assert time.monotonic() < deadline, f"the child of a job killed with {sig!r} is still running"
            time.sleep(0.05)


def test_without_a_server_a_job_runs_in_its_own_process(tmp_path, monkeypatch):
    monkeypatch.delenv(stepserver.ENV, raising=False)
    proc = run(tmp_path, "hello")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3 and "served False" in out and f"pid {proc.pid} " in out
