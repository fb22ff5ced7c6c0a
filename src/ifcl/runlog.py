"""Per-rule log files: everything a step prints (progress bars included) goes to the rule's ``log:`` file."""
from __future__ import annotations

import os
import socket
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
