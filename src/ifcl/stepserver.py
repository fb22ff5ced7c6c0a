"""A warm process for the workflow's local jobs: the steps' libraries imported once, each job forked from it.

Every step is a Python process that imports torch, torchvision, timm and open_clip before doing any work: about
4 s of CPU on a small machine, more than most steps of a small config spend computing. When Snakemake runs jobs on
this machine (its local executor), the workflow starts one *step server* (``onstart`` in ``Snakefile``) that has
imported those libraries and nothing of ifcl. A job's script (``ifcl.runlog.job``) hands itself to the server:
the server forks, the child takes the job's standard streams, working directory, environment, ``sys.path`` and
arguments, and runs the same script file from its first line, as a fresh interpreter would (ifcl's modules are
imported there, from disk); the job's process waits and exits with the child's status.

What a job computes does not depend on where it runs: every step seeds every generator and sets its threads
itself, and nothing of ifcl is imported before the fork. ``tests/test_slurm.py`` compares every file of a local
run (served) with the same run on a SLURM cluster (no server there) byte for byte.

A job runs in its own process instead (nothing is handed over) when no server is running (not Linux, or not
Snakemake's local executor), under SLURM, with another Python (a conda environment or a container), or with
``IFCL_STEP_SERVER=off`` in the environment.
Stopping: a job killed (SIGTERM, SIGINT) passes the signal on to its child; a job killed with SIGKILL closes its
connection, and the server kills the child. The server ignores SIGINT (Ctrl-C reaches the jobs through their own
processes); when Snakemake ends (or the server is stopped) it sends SIGTERM to the children left and gives them
30 s to end (a training job writes its epoch checkpoint, ifcl.checkpoint) before SIGKILL; a server that is killed
takes its children with it (Linux: the parent-death signal, SIGTERM).
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

ENV = "IFCL_STEP_SERVER"  # the server's socket; "off" disables handing over
_PYTHON = "IFCL_STEP_SERVER_PYTHON"  # the interpreter the server runs: a job under another one runs itself
_CHILD = "IFCL_STEP_SERVER_CHILD"  # set in a served job (its script must not hand itself over again)
PRELOAD = ("numpy", "PIL.Image", "safetensors.torch", "torch", "torchvision", "timm", "open_clip", "matplotlib")


# ---- the job's side ----

def hand_over(script: str) -> int | None:
    """Run ``script`` (this process's own script file) in a child of the step server; return its exit status,
    or None if there is no server to hand it to (the caller then runs the script itself)."""
    path = os.environ.get(ENV)
    if (not path or path == "off" or os.environ.get(_CHILD) or os.environ.get("SLURM_JOB_ID")
            or os.environ.get(_PYTHON) != sys.executable):
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    request = {"script": os.path.abspath(script), "cwd": os.getcwd(), "env": dict(os.environ),
               "path": sys.path, "argv": sys.argv}
    sys.stdout.flush()
    sys.stderr.flush()
    socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
    reply = conn.makefile("r")
    first = reply.readline()
    if not first.strip():  # the server ended before it started the job: nothing ran, so run it here
        return None
    child = int(first)

    def forward(signum, frame):
        try:
            os.killpg(child, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    line = reply.readline()
    return int(line) if line.strip() else 1


# ---- the workflow's side ----

def available() -> bool:
    """Linux only: elsewhere forking a process that has loaded these libraries is not safe (macOS) or possible."""
    return sys.platform.startswith("linux") and os.environ.get(ENV) != "off"


def start() -> tuple[subprocess.Popen, str]:
    """Start a server for this process's jobs and point them at it (the environment its jobs inherit)."""
    folder = tempfile.mkdtemp(prefix="ifcl-steps-")
    path = os.path.join(folder, "server.sock")
    proc = subprocess.Popen([sys.executable, "-m", "ifcl.stepserver", path, str(os.getpid())],
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30  # it listens before its imports: jobs that come early wait in its queue
    while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.environ[ENV] = path
    os.environ[_PYTHON] = sys.executable
    return proc, folder


def stop(server: tuple[subprocess.Popen, str]) -> None:
    proc, folder = server
    proc.terminate()
    proc.wait()
    os.environ.pop(ENV, None)
    os.environ.pop(_PYTHON, None)
    _remove(os.path.join(folder, "server.sock"))


# ---- the server ----

def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the job's process and run its script; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # the job's signals reach the child and whatever it starts (data loader workers)
        _die_with_parent(signal.SIGTERM)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt, as in a fresh interpreter
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"], **{_CHILD: "1"})
        sys.path[:] = request["path"]
        sys.argv[:] = request["argv"]
        import runpy

        runpy.run_path(request["script"], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001  (reported on the job's stderr, as an interpreter would)
        import traceback

        traceback.print_exc()
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()  # what the interpreter would run at exit
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _die_with_parent(sig: int = signal.SIGKILL) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG


def serve(path: str, parent: int) -> None:
    """Listen on ``path``; fork a child for each job; exit when process ``parent`` is gone."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".new")
    listener.listen(128)  # jobs that connect before the imports below are done wait here
    os.rename(path + ".new", path)  # the socket appears once it listens
    _die_with_parent()
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    running: dict[socket.socket, int] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while os.getppid() == parent:
            ready, _, _ = select.select([listener, *running], [], [], 0.05)
            for conn in ready:
                if conn is listener:
                    conn, _ = listener.accept()
                    msg, fds, _, _ = socket.recv_fds(conn, 1 << 24, 3)
                    while not msg.endswith(b"\n"):
                        msg += conn.recv(1 << 24)
                    pid = os.fork()
                    if pid == 0:
                        listener.close()
                        for other in running:
                            other.close()
                        _child(json.loads(msg), fds)
                    for fd in fds:
                        os.close(fd)
                    conn.sendall(f"{pid}\n".encode())
                    running[conn] = pid
                elif not conn.recv(1):  # the job's process is gone (killed): so is its child
                    _kill(running.pop(conn))
                    conn.close()
            for conn, pid in list(running.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    try:
                        conn.sendall(f"{code if code >= 0 else 128 - code}\n".encode())
                    except OSError:
                        pass
                    conn.close()
                    del running[conn]
    finally:
        _stop_children(list(running.values()))
        _remove(path)  # also when Snakemake was killed and stop() never ran


def _remove(path: str) -> None:
    for name in (path, path + ".new"):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass


def _stop_children(pids: list[int], grace: float = 30) -> None:
    """SIGTERM to each child's process group, up to ``grace`` seconds for them to end, then SIGKILL."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    left = list(pids)
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    left.remove(pid)
            except ChildProcessError:
                left.remove(pid)
        time.sleep(0.05)
    for pid in left:
        _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
