"""The whole offline demo (config/demo.yaml) from scratch, through `ifcl bench demo`, and the README's demo tables
against the summary it writes. Not in the default run (about 10 minutes on 2 cores): `pytest -m demo`, which also
runs the demo through the SLURM profile (tests/test_slurm.py)."""
import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.demo


def rows(markdown: str, names: set[str]) -> list[str]:
    """The table rows of ``markdown`` whose first cell is one of ``names``, in order."""
    return [line.strip() for line in markdown.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in names]


def test_the_demo_runs_and_gives_the_readme_tables(tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "-m", "ifcl.cli", "bench", "demo", "--cores", "2", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    summary = report["summary_md"]
    # every row of the summary's tables: the experiments, and DIKI's per-dataset rows
    names = {line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| demo_")}
    assert {"demo_inflora", "demo_inflora-b5", "demo_inflora-ca", "demo_seq-lora", "demo_diki"} <= names
    assert rows((REPO / "README.md").read_text(), names) == rows(summary, names)
