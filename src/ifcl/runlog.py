"""Per-rule log files: everything a step prints goes to the rule's ``log:`` file (plain lines, see
:mod:`ifcl.progress`, which also keeps the job's status file).

Every script of the workflow starts with ``with job(snakemake):``.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path


@contextmanager
def logging_to(path: str | Path):
    """Redirect stdout and stderr to ``path``; an exception is written there too, then re-raised. Under SLURM the
    first line names the job id, the node and the CPUs the job step was given."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as f, redirect_stdout(f), redirect_stderr(f):
        if os.environ.get("SLURM_JOB_ID"):  # which cluster job this was, to find its sbatch log and accounting
            cpus = os.environ.get("SLURM_CPUS_PER_TASK", "?")
            print(f"SLURM job {os.environ['SLURM_JOB_ID']} on {socket.gethostname()} ({cpus} CPUs)")
        try:
            yield
        except BaseException:
            traceback.print_exc(file=f)
            raise


class Terminated(BaseException):
    """The job was told to stop (SIGTERM): its status file says so, and the process exits with an error."""


@contextmanager
def job(snakemake):
    """The body of a rule's script: handed to the step server if the workflow runs one (:mod:`ifcl.stepserver`;
    this process then exits with the served job's status), otherwise run here; either way logged to the rule's
    log file."""
    from .stepserver import hand_over

    code = hand_over(sys.argv[0])
    if code is not None:
        os._exit(code)
    from . import checkpoint, progress

    def terminated(signum, frame):  # Snakemake stops its jobs with SIGTERM (Ctrl-C, a failed job elsewhere)
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, terminated)
    with logging_to(snakemake.log[0]):
        progress.start_job(snakemake.rule, dict(snakemake.wildcards.items()), snakemake.log[0])
        checkpoint.start_job(snakemake)
        try:
            yield
        except BaseException as e:
            if checkpoint.stop_message():
                print(checkpoint.stop_message(), flush=True)
            checkpoint.finish_job(success=False)
            progress.finish_job(e)
            raise
        checkpoint.finish_job(success=True)
        progress.finish_job()
