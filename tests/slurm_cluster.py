"""A throw-away single-node SLURM cluster for tests (Debian 12's SLURM 22.05 and MUNGE 0.5.15).

Needs root and the Debian packages (slurm-wlm pulls in slurmctld, slurmd and slurm-client):

    apt-get install -y slurm-wlm munge

Everything the cluster writes lives in the given directory: MUNGE key and socket, slurm.conf, state, spool, logs,
pid files. Nothing under /etc or /run is changed (the packages' own munge.key and init scripts are not used), and
the daemons listen on free TCP ports. The node is this machine (CPUs and memory as `slurmd -C` reports them) in one
partition, "debug", the default. No cgroups (proctrack/linuxproc, task/none) and no accounting (no slurmdbd).

Clients find the cluster through the environment that `single_node_cluster` yields: SLURM_CONF, and PATH with a
small `srun` wrapper first (snakemake-executor-plugin-slurm-jobstep strips every SLURM_* variable, SLURM_CONF
included, before it calls `srun` inside a job). With accounting off `sacct` fails, and Snakemake's SLURM executor
(which polls with sacct by default) then waits for ever: it must be told `--slurm-status-command squeue`. It polls
after `--seconds-between-status-checks` (default 10 s), then 10 s longer after every poll that finds no job
finished, and after `--slurm-init-seconds-before-status-checks` (default 40 s) once one has: set both to about the
time a job takes (5 s for a trivial rule). For example:

    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    with single_node_cluster(tmp_path / "slurm") as slurm_env:
        subprocess.run(["snakemake", "--executor", "slurm", "--jobs", "4", "--slurm-status-command", "squeue",
                        "--seconds-between-status-checks", "5", "--slurm-init-seconds-before-status-checks", "5"],
                       cwd=workdir, env={**os.environ, **slurm_env}, check=True)
"""

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

APT_COMMAND = "apt-get install -y slurm-wlm munge"
# The daemons, and the clients that this module and Snakemake's SLURM executor call.
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
# The daemons live in /usr/sbin, which is not on every PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
PARTITION = "debug"
ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")


def _which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def missing_requirements() -> str | None:
    """Why a cluster cannot be started here (a sentence for pytest.skip), or None when it can."""
    if not Path("/proc/self").exists():
        return "a SLURM test cluster needs Linux"
    if os.geteuid() != 0:
        return "a SLURM test cluster needs root (its slurmd runs jobs as their submitting user)"
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return f"SLURM/MUNGE programs not found: {', '.join(missing)} (install them with `{APT_COMMAND}`)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_config(cpus: int | None, memory_mb: int | None, gpus: int) -> str:
    """slurm.conf's lines for the node: this machine as `slurmd -C` prints it (NodeName=<short hostname> CPUs=...
    RealMemory=...), with made-up CPUs, memory or GPUs where asked for."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    node = dict(item.split("=", 1) for item in out.splitlines()[0].split())
    lines = []
    if cpus or memory_mb:
        lines += ["# Believe this file, not the hardware that slurmd finds.", "SlurmdParameters=config_overrides"]
    if cpus:  # a bare CPU count, no sockets/cores/threads layout to contradict it
        node = {"NodeName": node["NodeName"], "CPUs": str(cpus), "RealMemory": node["RealMemory"]}
    if memory_mb:
        node["RealMemory"] = str(memory_mb)
    if gpus:
        lines.append("GresTypes=gpu")
        node["Gres"] = f"gpu:{gpus}"
    # NodeAddr: reach the node at 127.0.0.1 whatever its hostname resolves to.
    lines.append(" ".join(f"{k}={v}" for k, v in node.items()) + " NodeAddr=127.0.0.1 State=UNKNOWN")
    return "\n".join(lines)


def _slurm_conf(root: Path, host: str, node_config: str) -> str:
    return f"""\
ClusterName=testcluster
# slurmctld only starts on the host named here (its short hostname); the address saves a DNS lookup.
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
# MUNGE through our own munged's socket (the clients read it from here too).
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No cgroups, no accounting: plain /proc process tracking, no task binding, no slurmdbd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# Start submitted batch jobs at once (by default they wait up to 3 s to be scheduled together).
SchedulerParameters=batch_sched_delay=0
# Cores and memory are consumable; a job without --mem gets 256 MB per CPU rather than the whole node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
# Finished jobs stay visible to squeue for 5 minutes (Snakemake's `--slurm-status-command squeue` needs that).
MinJobAge=300
ReturnToService=2
KillWait=5
{node_config}
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join("  " + line for line in text) or "  (empty)"


def _logs(root: Path) -> str:
    """The last lines of every daemon's log (<daemon>.log) and its stdout/stderr (<daemon>.out)."""
    return "\n".join(f"--- {log} ---\n{_tail(log)}" for log in sorted((root / "log").iterdir()))


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, timeout=30)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _kill_job_processes(conf: Path) -> None:
    """SIGKILL what is left of this cluster's jobs: processes with our SLURM_CONF that are slurmstepd or in a job."""
    ours = f"SLURM_CONF={conf}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            comm = (proc / "comm").read_text().strip()
        except OSError:  # gone meanwhile
            continue
        if ours in environ and (comm == "slurmstepd" or any(v.startswith(b"SLURM_JOB_ID=") for v in environ)):
            with contextlib.suppress(OSError):
                os.kill(int(proc.name), signal.SIGKILL)


@contextlib.contextmanager
def single_node_cluster(tmp_dir: Path, timeout: float = 60, *, cpus: int | None = None,
                        memory_mb: int | None = None, gpus: int = 0):
    """Start munged, slurmctld and slurmd in tmp_dir; yield the environment variables clients need.

    Returns once the node is idle and a test job has run (job 1; about 3 s), or raises RuntimeError with the tails
    of the daemons' logs after timeout seconds. On exit the jobs left are cancelled and the daemons stopped, also
    when the start-up or the body fails.

    The node is this machine unless cpus or memory_mb make it pretend to have those (SLURM then accepts, say,
    `--cpus-per-task=8 --mem=32000` on a 2-core machine; nothing is enforced anyway), and gpus gives it fake GPUs
    (gres gpu, device files that are /dev/null) so that `--gpus=1` jobs run, with CUDA_VISIBLE_DEVICES set.
    """
    root = Path(tmp_dir).resolve()
    for sub in ("munge", "state", "spool", "log", "run", "bin", "dev"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, socket.gethostname().split(".")[0], _node_config(cpus, memory_mb, gpus)))
    if gpus:  # gres.conf sits next to slurm.conf; the gpu plugin wants numbered character devices
        for i in range(gpus):
            (root / f"dev/nvidia{i}").unlink(missing_ok=True)
            os.mknod(root / f"dev/nvidia{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # 1,3 is /dev/null
        (root / "gres.conf").write_text(f"Name=gpu File={root}/dev/nvidia[0-{gpus - 1}]\n")
    else:
        (root / "gres.conf").unlink(missing_ok=True)
    # A fresh MUNGE key: munged insists on a file that only its user (root) can read.
    key = root / "munge/munge.key"
    key.unlink(missing_ok=True)
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    # An `srun` that brings SLURM_CONF back (see the module docstring), first on the jobs' PATH.
    srun = root / "bin/srun"
    srun.write_text(f'#!/bin/sh\nSLURM_CONF="{conf}" exec "{_which("srun")}" "$@"\n')
    srun.chmod(0o755)
    env = {"SLURM_CONF": str(conf), "PATH": f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}

    daemons: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        # In the foreground (-F/-D), so that they stay our children: stopped and reaped by us alone.
        with open(root / f"log/{name}.out", "wb") as out:
            daemons.append(subprocess.Popen([_which(name), *args], env={**os.environ, **env}, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True))

    try:
        deadline = time.monotonic() + timeout
        # --force: munged refuses a socket whose parent directories are not searchable by everyone (pytest's tmp
        # dirs are 0700); only root uses this socket, so that is fine.
        start("munged", "--foreground", "--force", f"--key-file={key}", f"--socket={root}/munge/munge.socket",
              f"--log-file={root}/log/munged.log", f"--pid-file={root}/run/munged.pid",
              f"--seed-file={root}/munge/munged.seed")
        while not (root / "munge/munge.socket").exists():
            if daemons[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SLURM test cluster did not start: munged did not\n{_logs(root)}")
            time.sleep(0.1)
        start("slurmctld", "-D", "-c", "-f", str(conf))  # -c: forget jobs saved by an earlier cluster in tmp_dir
        start("slurmd", "-D", "-f", str(conf))

        # Ready when the node reports in as idle ...
        node_state = ""
        while node_state != "idle":
            dead = [Path(p.args[0]).name for p in daemons if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"node still {node_state!r} after {timeout:.0f} s"
                raise RuntimeError(f"SLURM test cluster did not start: {why}\n{_logs(root)}")
            time.sleep(0.5)
            node_state = _run(["sinfo", "--noheader", "--Node", "--format=%T"], env).stdout.strip()
        # ... and has run a batch job (slurmctld's first scheduling pass comes about 3 s after its start).
        probe = _run(["sbatch", "--parsable", "--output=/dev/null", "--wrap=true"], env)
        job_state = "PENDING" if probe.returncode == 0 else f"not submitted: {probe.stderr.strip()}"
        while job_state != "COMPLETED":
            if job_state not in ACTIVE_STATES or time.monotonic() > deadline:
                raise RuntimeError(f"SLURM test cluster cannot run jobs (test job: {job_state!r})\n{_logs(root)}")
            time.sleep(0.25)
            job_state = _run(["squeue", "--noheader", "--states=all", "--format=%T", f"--jobs={probe.stdout.strip()}"],
                             env).stdout.strip()
        yield env
    finally:
        # Cancel the jobs still queued or running, and give slurmd a few seconds to end them.
        if len(daemons) == 3 and all(p.poll() is None for p in daemons):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _run(["scancel", f"--partition={PARTITION}"], env)
                for _ in range(20):
                    if not _run(["squeue", "--noheader", f"--states={','.join(ACTIVE_STATES)}"], env).stdout.strip():
                        break
                    time.sleep(0.5)
        for proc in reversed(daemons):  # slurmd, slurmctld, munged
            _stop(proc)
        _kill_job_processes(conf)
