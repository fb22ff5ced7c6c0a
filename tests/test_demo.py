"""The whole offline demo (config/demo.yaml) from scratch, through `ifcl bench demo`: the README's demo tables are
the summary it writes (`ifcl readme-tables --check`), and each claim the README makes about them holds with a margin
above the spread between seeds. Not in the default run (several minutes on 2 cores): `pytest -m demo`, which also
runs the demo through the SLURM profile (tests/test_slurm.py)."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.demo


def test_the_demo_runs_gives_the_readme_tables_and_its_claims_hold(tmp_path):
    out = tmp_path / "demo.json"
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "ifcl.cli", "bench", "demo", "--cores", "2", "--out", str(out),
                           "--keep", str(work)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary_md = work / "results/summary/summary.md"
    check = subprocess.run([sys.executable, "-m", "ifcl.cli", "readme-tables", str(summary_md), "--check"],
                           cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

    summary = json.loads((work / "results/summary/summary.json").read_text())
    inflora, seq, ca = summary["demo_inflora"], summary["demo_seq-lora"], summary["demo_inflora-ca"]
    # InfLoRA forgets less than seq-lora, by more than either spread
    gap = seq["forgetting_mean"] - inflora["forgetting_mean"]
    assert gap > max(seq["forgetting_std"], inflora["forgetting_std"]), (gap, seq, inflora)
    # classifier alignment lifts A_T by far more than the spread
    lift = ca["final_mean"] - inflora["final_mean"]
    assert lift > 15 and lift > 3 * max(ca["final_std"], inflora["final_std"])
    # DIKI: an unseen dataset stays near zero-shot with a small λ; once learnt, above zero-shot with a large λ
    for seed in (0, 1):
        run = work / "results/runs/demo_diki" / f"seed{seed}"
        zero_shot = json.loads((run / "metrics.json").read_text())["zero_shot_per_task"]
        first, last = (json.loads((run / f"task{t}/eval.json").read_text()) for t in (0, 1))
        assert abs(first["accuracy"][1] - zero_shot[1]) <= 1.0 and first["mean_weight"][1] < 0.1
        assert all(a > z for a, z in zip(last["accuracy"], zero_shot)) and min(last["mean_weight"]) > 0.5


def test_the_demo_data_is_what_data_dvc_records(tmp_path):
    """The repository's data.dvc records the demo's prepared data: `snakemake data` on config/demo.yaml makes it
    again bit for bit: recording it again (`dvc add data`) leaves data.dvc as it is."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("data.dvc", ".dvcignore"):
        shutil.copyfile(REPO / name, work / name)

    def run(*args):
        proc = subprocess.run(list(args), cwd=work, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    run(sys.executable, "-m", "snakemake", "data", "--cores", "2", "-s", str(REPO / "Snakefile"), "-d", str(work),
        "--configfile", str(REPO / "config/demo.yaml"))
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "add", "-q", "data")
    assert (work / "data.dvc").read_text() == (REPO / "data.dvc").read_text()
