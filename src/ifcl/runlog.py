"""Per-rule log files: everything a step prints (progress bars included) goes to the rule's ``log:`` file."""
from __future__ import annotations

import traceback
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path


@contextmanager
def logging_to(path: str | Path):
    """Redirect stdout and stderr to ``path``; an exception is written there too, then re-raised."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as f, redirect_stdout(f), redirect_stderr(f):
        try:
            yield
        except BaseException:
            traceback.print_exc(file=f)
            raise
