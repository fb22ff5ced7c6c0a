"""Files checked by content (ifcl.integrity, ifcl.files, the folder datasets): a damaged result file is moved aside
and regenerated, never used; an input put back with an old timestamp re-runs what was made from other content of
it; a user's class folders are followed image by image."""
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import TINY_CONFIG, snakemake, tree
from ifcl.cli import job_stats
from ifcl.files import read_csv
from ifcl.integrity import state_problem
from ifcl.state import StateError, load_state, save_state

pytestmark = pytest.mark.pipeline
RUN = "results/runs/tiny_inflora/seed0"


def ifcl(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ifcl.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_state_files_are_checked_without_torch_as_load_state_checks_them(tmp_path):
    path = tmp_path / "s.safetensors"
    save_state(path, {"b": torch.arange(6, dtype=torch.int64).reshape(2, 3), "a": torch.randn(4, 5),
                      "h": torch.ones(3, dtype=torch.bfloat16), "e": torch.zeros(0)}, {"kind": "test"})
    assert state_problem(path) is None
    good = path.read_bytes()
    for flip in (len(good) - 1, len(good) - 40):
        damaged = bytearray(good)
        damaged[flip] ^= 1
        path.write_bytes(bytes(damaged))
        assert state_problem(path) == "was modified after it was written (its tensors or metadata do not match its digest)"
        with pytest.raises(StateError):
            load_state(path)
    path.write_bytes(good[:-8])
    assert state_problem(path) is not None


def test_damaged_files_are_moved_aside_and_regenerated_byte_for_byte(copy_of_tiny_run):
    """An accuracy edited in eval.json, one flipped bit in a state file, a manifest cut at a row boundary: each is
    refused where it is read, `ifcl check -n` names it, and a plain `snakemake` moves it aside and regenerates it
    and what was made from it, to the same bytes as before."""
    wd = copy_of_tiny_run
    before = tree(wd, "results", "data/prepared")
    evals = wd / RUN / "task1/eval.json"
    evals.write_text(evals.read_text().replace('"accuracy": ', '"accuracy": 9', 1))
    adapter = wd / RUN / "task1/adapter.safetensors"
    flipped = bytearray(adapter.read_bytes())
    flipped[-3] ^= 1
    adapter.write_bytes(bytes(flipped))
    shown = ifcl("run", "show", RUN, cwd=wd)
    assert shown.returncode != 0 and "task1/adapter.safetensors was modified after it was written" in shown.stderr
    manifest = wd / "data/prepared/tiny_shapes/test.csv"
    full = manifest.read_bytes()
    manifest.write_bytes(b"".join(full.splitlines(keepends=True)[:-2]))  # `head -n -2`

    report = ifcl("check", "-n", cwd=wd)
    assert report.returncode == 1
    for path in (f"{RUN}/task1/eval.json", f"{RUN}/task1/adapter.safetensors", "data/prepared/tiny_shapes/test.csv"):
        assert f"ifcl check: {path} " in report.stdout, report.stdout
    assert "would be moved aside" in report.stdout and not (wd / "quarantine").exists()

    out = snakemake(wd, TINY_CONFIG).stderr
    assert f"ifcl check: {RUN}/task1/eval.json does not match its recorded digest; moved to quarantine/" in out
    assert f"ifcl check: {RUN}/task1/adapter.safetensors was modified after it was written (its tensors or metadata do not match its digest)" in out
    assert tree(wd, "results", "data/prepared") == before
    kept = {p.relative_to(wd / "quarantine").parts[1:] for p in (wd / "quarantine").rglob("*") if p.is_file()}
    assert kept == {tuple(path.split("/")) for path in
                    (*(f"{RUN}/task1/{name}" for name in ("eval.json", "eval.json.sha256", "adapter.safetensors")),
                     "data/prepared/tiny_shapes/test.csv", "data/prepared/tiny_shapes/test.csv.sha256")}
    assert "nothing to regenerate" in ifcl("check", cwd=wd).stdout


def test_an_input_put_back_with_an_old_timestamp_reruns_what_was_made_from_other_content(copy_of_tiny_run):
    """A valid file replaced by another valid one with an older modification time (`cp -p`, `touch -d`): Snakemake
    alone would see nothing to do; the check re-runs its dependants. Put back, the original results return."""
    wd = copy_of_tiny_run
    task1, task0 = wd / RUN / "task1", wd / RUN / "task0"
    matrix = wd / RUN / "acc_matrix.csv"
    original = {name: (task1 / name).read_bytes() for name in ("eval.json", "eval.json.sha256")}
    original_matrix = matrix.read_bytes()
    old = (1577836800, 1577836800)  # 2020-01-01
    for name in original:
        (task1 / name).write_bytes((task0 / name).read_bytes())
        os.utime(task1 / name, old)
    plan = snakemake(wd, TINY_CONFIG, "-n").stdout
    assert "aggregate_run" in plan and "evaluate_task" not in plan, plan
    snakemake(wd, TINY_CONFIG)
    assert matrix.read_bytes() != original_matrix
    for name, data in original.items():
        (task1 / name).write_bytes(data)
        os.utime(task1 / name, old)
    snakemake(wd, TINY_CONFIG)
    assert matrix.read_bytes() == original_matrix
    assert "Nothing to be done" in snakemake(wd, TINY_CONFIG, "-n").stdout


def make_images(folder, n, colour, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        Image.new("RGB", (20, 20), colour).save(folder / f"{i}.png")


def test_a_users_folder_is_followed_image_by_image(tmp_path, tiny_config):
    """Images added, removed or replaced (also by a copy keeping the old times) re-run the manifest and what reads
    it; a non-image file is named in the log; an unreadable image stops the manifest job, naming it, before any
    training job, or is left out and named with skip_unreadable."""
    root = tmp_path / "imgs"
    for c, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        make_images(root / f"class_{c}", 5, colour)
    (root / "class_0" / "notes.txt").write_text("not an image")
    tiny_config["datasets"]["mine"] = {"type": "folder", "path": str(root),
                                       "split": {"rule": "random", "test_fraction": 0.2, "seed": 0},
                                       "train_transform": "random-resized-crop-flip", "test_transform": "resize"}
    tiny_config["experiments"] = {"mine": {**TINY_CONFIG["experiments"]["tiny_seq-lora"], "dataset": "mine"}}
    wd = tmp_path / "wd"
    target = "results/runs/mine/seed0/tasks.json"
    train = wd / "data/prepared/mine/train.csv"

    def run_and_plan():
        """Run the target; the rules of the jobs it ran (Snakemake's job stats)."""
        proc = snakemake(wd, tiny_config, target)
        return job_stats(proc.stdout + proc.stderr), proc

    snakemake(wd, tiny_config, target)
    assert len(read_csv(train)) == 12
    log = (wd / "logs/folder_manifest/mine.log").read_text()
    assert f"not images, left out: 1 files ({root}/class_0/notes.txt)" in log
    assert "Nothing to be done" in snakemake(wd, tiny_config, target, "-n").stdout

    make_images(root / "class_0", 5, (255, 0, 0), start=5)  # 5 images added
    plan, _ = run_and_plan()
    assert "folder_manifest" in plan
    assert len(read_csv(train)) + len(read_csv(wd / "data/prepared/mine/test.csv")) == 20

    (root / "class_1" / "0.png").unlink()  # one removed
    plan, _ = run_and_plan()
    assert "folder_manifest" in plan

    image = root / "class_2" / "1.png"  # one replaced by other content, with its old times kept (cp -p)
    times = (image.stat().st_atime, image.stat().st_mtime)
    rows = {r["path"]: r["sha256"] for r in read_csv(train) + read_csv(wd / "data/prepared/mine/test.csv")}
    Image.new("RGB", (20, 20), (0, 0, 254)).save(image)
    os.utime(image, times)
    plan, _ = run_and_plan()
    assert "folder_manifest" in plan
    after = {r["path"]: r["sha256"] for r in read_csv(train) + read_csv(wd / "data/prepared/mine/test.csv")}
    assert after[str(image)] != rows[str(image)] and len(after) == len(rows)

    (root / "class_2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = snakemake(wd, tiny_config, check=False)
    assert proc.returncode != 0
    log = (wd / "logs/folder_manifest/mine.log").read_text()
    assert f"{root}/class_2/broken.png is not a readable image" in log and "skip_unreadable: true" in log
    assert not (wd / "logs/train_task").exists()
    tiny_config["datasets"]["mine"]["skip_unreadable"] = True
    snakemake(wd, tiny_config, target)
    assert f"skipped, not a readable image: {root}/class_2/broken.png" in \
        (wd / "logs/folder_manifest/mine.log").read_text()


def test_ifcl_run_compare_names_what_differs(copy_of_tiny_run, tiny_run):
    same = ifcl("run", "compare", str(tiny_run), str(copy_of_tiny_run), "--run", "tiny_inflora/seed0", cwd=tiny_run)
    assert same.returncode == 0 and "none differ" in same.stdout
    (copy_of_tiny_run / RUN / "task0/eval.json").write_text("{}\n")
    differ = ifcl("run", "compare", str(tiny_run), str(copy_of_tiny_run), "--run", "tiny_inflora/seed0", cwd=tiny_run)
    assert differ.returncode == 1 and re.search(rf"{RUN}/task0/eval.json +differs", differ.stdout)
    assert "1 differ" in differ.stdout


def test_bench_check_times_the_check_on_a_fabricated_tree(tmp_path):
    proc = ifcl("bench", "check", "--files", "40", "--text", "20", "--state-kb", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    first, later = proc.stdout.splitlines()[:2]
    assert first.startswith("first (every file read):") and "40 files checked" in first
    assert later.startswith("next (nothing changed):") and "0 file reads" in later


def test_a_damaged_digest_file_is_found_although_its_data_file_is_unchanged(tmp_path):
    """The check's cache covers the digest file too: a `.sha256` damaged after a check that passed is found by the
    next one, which moves both aside (and a digest file that is not even a digest never crashes it)."""
    from ifcl.files import write_json
    from ifcl.integrity import check_workdir

    data = tmp_path / "results/runs/x/seed0/metrics.json"
    write_json(data, {"A_T": 1.0})
    assert not check_workdir(tmp_path).moved
    digest = data.with_name("metrics.json.sha256")
    digest.write_text("0" * 64 + "  metrics.json\n# rows: many\n")
    report = check_workdir(tmp_path)
    assert [(path, why) for path, _, why in report.moved] == [("results/runs/x/seed0/metrics.json",
                                                                "does not match its recorded digest")]
    assert not data.exists() and not digest.exists()


def test_the_check_only_reports_for_a_start_that_runs_no_job(monkeypatch):
    from ifcl.integrity import snakemake_cli_args, snakemake_command, snakemake_runs_jobs

    monkeypatch.setattr(sys, "argv", ["/usr/bin/snakemake", "all", "-n"])
    assert snakemake_cli_args() == ["all", "-n"]
    monkeypatch.setattr(sys, "argv", ["/x/site-packages/snakemake/__main__.py", "all"])
    assert snakemake_cli_args() == ["all"]
    monkeypatch.setattr(sys, "argv", ["/x/bin/pytest", "-n", "2"])  # Snakemake started from Python
    assert snakemake_cli_args() is None

    assert snakemake_runs_jobs(["all", "--cores", "2"]) and snakemake_runs_jobs(["--profile", "profiles/slurm"])
    for argv in (["-n"], ["all", "-np"], ["--dry-run"], ["--lint"], ["--report", "r.html"], ["--dag"],
                 ["--summary"], ["--unlock"], ["-t"], ["--list-changes", "params"], ["--cleanup-metadata", "x"]):
        assert not snakemake_runs_jobs(argv), argv
    assert snakemake_runs_jobs(["--report", "r.html", "--report-after-run"])
    cmd = snakemake_command(["runs", "--cores", "all", "--configfile", "c.yaml"], ["a.csv", "b.json"])
    assert cmd[1:] == ["-m", "snakemake", "a.csv", "b.json", "--cores", "all", "--configfile", "c.yaml"]


def test_a_dry_run_changes_nothing_and_a_damaged_manifest_is_regenerated_alone(copy_of_tiny_run):
    """A dry run, --lint and --report say what the check would move and change no file; the next run moves the
    damaged manifest aside and regenerates it before planning, to the same bytes, re-running nothing made from
    it (so data/ matches what DVC recorded again)."""
    wd = copy_of_tiny_run
    manifest = wd / "data/prepared/tiny_shapes/test.csv"
    original = manifest.read_bytes()
    manifest.write_bytes(original + b"x.png,1,x,0\n")

    def snapshot():
        return {str(p.relative_to(wd)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(wd.rglob("*"))
                if p.is_file() and ".snakemake" not in p.parts and "logs" not in p.parts and p.name != "config.yaml"}

    before = snapshot()
    for args in (["-n"], ["--lint"], ["--report", str(wd.parent / "report.zip")]):
        out = snakemake(wd, TINY_CONFIG, *args, check=False)
        assert "data/prepared/tiny_shapes/test.csv does not match its recorded digest; it would be moved aside" \
               in out.stderr, args
        assert snapshot() == before, args
    results = tree(wd, "results")
    proc = snakemake(wd, TINY_CONFIG)
    assert "regenerating what was moved aside, before planning this run: data/prepared/tiny_shapes/test.csv" \
           in proc.stderr
    assert manifest.read_bytes() == original and tree(wd, "results") == results
    assert proc.stderr.rstrip().endswith("Nothing to be done (all requested files are present and up to date).")
