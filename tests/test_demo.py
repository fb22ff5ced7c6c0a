"""The whole offline demo (config/demo.yaml) from scratch, through `ifcl bench demo`, then the comparison demo
(config/demo_comparison.yaml) in its directory, and the MTIL comparison demo (config/demo_mtil.yaml) from scratch:
the README's demo, comparison and MTIL tables are the summaries they write, within tolerance (`ifcl readme-tables --check`: another CPU gives other floats), and each claim the README
makes about them holds with a margin above the spread between seeds. Not in the default run (several minutes on 2 cores): `pytest -m demo`, which also
runs the demo through the SLURM profile (tests/test_slurm.py)."""
import json
import shutil
from pathlib import Path
import subprocess
import sys

import pytest

from conftest import REPO
from ifcl.cli import job_stats

pytestmark = pytest.mark.demo


def readme_holds(summary_md, section):
    check = subprocess.run([sys.executable, "-m", "ifcl.cli", "readme-tables", str(summary_md), "--section",
                            section, "--check"], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo run from scratch (``ifcl bench demo``): its working directory, and its summary as the demo alone
    wrote it (the comparison demo, run in the same directory, writes the summary again)."""
    root = tmp_path_factory.mktemp("demo")
    work = root / "work"
    proc = subprocess.run([sys.executable, "-m", "ifcl.cli", "bench", "demo", "--cores", "2", "--out",
                           str(root / "demo.json"), "--keep", str(work)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shutil.copytree(work / "results/summary", root / "demo_summary")
    return work, root / "demo_summary"


def test_the_demo_runs_gives_the_readme_tables_and_its_claims_hold(demo):
    work, summary_dir = demo
    readme_holds(summary_dir / "summary.md", "demo")
    summary = json.loads((summary_dir / "summary.json").read_text())
    inflora, seq, ca = summary["demo_inflora"], summary["demo_seq-lora"], summary["demo_inflora-ca"]
    # InfLoRA ends above seq-lora and forgets less, each by more than twice the larger spread between seeds
    for metric, sign in (("final", 1), ("forgetting", -1)):
        gap = sign * (inflora[f"{metric}_mean"] - seq[f"{metric}_mean"])
        assert gap > 2 * max(seq[f"{metric}_std"], inflora[f"{metric}_std"]), (metric, gap, seq, inflora)
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


def above(summary, a, b, metric):
    """a's mean exceeds b's by more than either's standard deviation."""
    gap = summary[a][f"{metric}_mean"] - summary[b][f"{metric}_mean"]
    return gap > max(summary[a][f"{metric}_std"], summary[b][f"{metric}_std"])


def test_the_comparison_demo_gives_the_readme_table_and_its_claims_hold(demo):
    """config/demo_comparison.yaml after the demo, in its directory: only the added methods train (the demo's runs
    are reused), the README's comparison tables are its summary, and the README's claims about them hold."""
    work, _ = demo
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work),
                           "--cores", "2", "--configfile", str(REPO / "config/demo_comparison.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = job_stats(proc.stdout + proc.stderr)  # demo_joint's 3 seeds are the only new tasks of rule train_task
    assert jobs["train_task"] == 3 and jobs["train_state"] == 11 * 3 * 5, jobs  # 11 state-chain methods
    readme_holds(work / "results/summary/summary.md", "comparison")
    s = json.loads((work / "results/summary/summary.json").read_text())
    methods = [n for n, e in s.items() if e["protocol"] == "cil" and n != "demo_joint"]
    trained = [n for n in methods if n != "demo_ranpac"]  # by gradient descent (RanPAC: a closed-form head)
    # the classifier rebuilt from class statistics (Gaussians and an alignment; EASE: prototypes), or the heads alone
    statistics = {"demo_inflora-ca", "demo_slca", "demo_ease", "demo_mos", "demo_hide-prompt"}
    heads_alone = [n for n in trained if n not in statistics]
    # joint training on every class bounds every continual method trained by gradient descent
    assert all(above(s, "demo_joint", n, "final") for n in trained)
    # RanPAC ends above every continual method, level with joint training (within the spread)
    assert all(above(s, "demo_ranpac", n, "final") for n in methods if n != "demo_ranpac")
    level = abs(s["demo_ranpac"]["final_mean"] - s["demo_joint"]["final_mean"])
    assert level < 2 * max(s["demo_ranpac"]["final_std"], s["demo_joint"]["final_std"]) + 1
    # every method with class statistics ends above every method with its trained heads alone; MOS highest of them
    assert all(above(s, a, b, "final") for a in statistics for b in heads_alone)
    assert all(above(s, "demo_mos", n, "final") for n in statistics - {"demo_mos"})
    # RanPAC, MOS and HiDe-Prompt forget less than every other continual method
    least = ("demo_ranpac", "demo_mos", "demo_hide-prompt")
    assert all(above(s, n, a, "forgetting") for a in least for n in methods if n not in least)
    # SD-LoRA ends above seq-lora and forgets less; so do each prompt method, C-LoRA and LAE forget less
    assert above(s, "demo_sd-lora", "demo_seq-lora", "final")
    for n in ("demo_sd-lora", "demo_l2p", "demo_dualprompt", "demo_coda-prompt", "demo_c-lora", "demo_lae"):
        assert above(s, "demo_seq-lora", n, "forgetting"), n
    # SD-LoRA ends highest of the methods that keep their trained heads alone
    assert all(above(s, "demo_sd-lora", n, "final") for n in heads_alone if n != "demo_sd-lora")


def test_the_mtil_demo_runs_from_scratch_gives_the_readme_table_and_its_claims_hold(tmp_path):
    """config/demo_mtil.yaml from scratch (``ifcl bench demo``, the CLIP's pretraining included): the README's MTIL
    table is its summary, and the README's claims about every MTIL method hold, each by more than the spread
    between seeds plus a margin for other CPUs."""
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "ifcl.cli", "bench", "demo", "--cores", "2", "--configfile",
                           "config/demo_mtil.yaml", "--out", str(tmp_path / "demo_mtil.json"), "--keep", str(work)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    readme_holds(work / "results/summary/summary.md", "mtil")
    s = json.loads((work / "results/summary/summary.json").read_text())

    def spread(*names, metric="transfer"):
        return max(s[n][f"{metric}_std"] for n in names)

    zero_shot = s["demo_mtil_continual-ft"]["zero_shot_transfer_mean"]  # the same frozen CLIP in every run
    assert all(s[n]["zero_shot_transfer_mean"] == zero_shot for n in s)
    # Continual-FT's Transfer falls below the zero-shot CLIP's: fine-tuning every weight costs the unseen datasets
    assert zero_shot - s["demo_mtil_continual-ft"]["transfer_mean"] > 2 * spread("demo_mtil_continual-ft") + 3
    # DIKI keeps it at zero-shot (a small λ on what it has not learnt), MoE-Adapters (DDAS) and ZSCL close to it,
    # each far above Continual-FT
    assert abs(s["demo_mtil_diki"]["transfer_mean"] - zero_shot) < 2 * spread("demo_mtil_diki") + 1
    for n in ("demo_mtil_moe-adapters", "demo_mtil_zscl"):
        assert zero_shot - s[n]["transfer_mean"] < 2 * spread(n) + 2.5, n
    for n in ("demo_mtil_diki", "demo_mtil_moe-adapters", "demo_mtil_zscl"):
        gap = s[n]["transfer_mean"] - s["demo_mtil_continual-ft"]["transfer_mean"]
        assert gap > 2 * spread(n, "demo_mtil_continual-ft") + 3, n
    # ZSCL ends with the highest Average of the methods that fine-tune the whole CLIP
    finetuned = ("demo_mtil_continual-ft", "demo_mtil_wise-ft", "demo_mtil_lwf", "demo_mtil_lwf-vr", "demo_mtil_icarl")
    for n in finetuned:
        assert s["demo_mtil_zscl"]["average_mean"] - s[n]["average_mean"] > 2 * spread(n, "demo_mtil_zscl",
                                                                                        metric="average") + 1, n
    # what a task learns and keeps: DIKI's prefixes are the smallest per-task file of learnt weights (MoE-Adapters':
    # its experts and routers; the fine-tuning family's: the whole CLIP)
    run = work / "results/runs/{}/seed0/task1"
    diki = (Path(str(run).format("demo_mtil_diki")) / "prefix.safetensors").stat().st_size
    others = {n: (Path(str(run).format(n)) / "state.safetensors").stat().st_size
              for n in (*finetuned, "demo_mtil_zscl", "demo_mtil_moe-adapters")}
    assert all(diki * 10 < size for size in others.values()), (diki, others)


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
