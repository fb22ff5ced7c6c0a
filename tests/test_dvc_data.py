"""data.dvc: the repository's DVC set-up shares data/ through a remote (here a folder), as the README describes."""
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

DVC = [sys.executable, "-m", "dvc"]


def run(cwd: Path, *args: str) -> str:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_data_is_committed_pushed_and_pulled_back_through_a_remote(tmp_path):
    lab = tmp_path / "clone"
    lab.mkdir()
    run(lab, "git", "init", "-q")
    shutil.copytree(REPO / ".dvc", lab / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    for name in (".dvcignore", "data.dvc", ".gitignore"):
        shutil.copy(REPO / name, lab / name)
    assert "path: data" in (lab / "data.dvc").read_text() and "md5" not in (lab / "data.dvc").read_text()

    data = lab / "data"
    (data / "raw" / "cifar100").mkdir(parents=True)
    (data / "raw" / "cifar100" / "ifcl-source.json").write_text('{"source": "cifar100"}\n')
    (data / "prepared" / "cifar100").mkdir(parents=True)
    (data / "prepared" / "cifar100" / "train.csv").write_text("path,label,class_name\ndata/x.png,0,apple\n")
    (data / "weights").mkdir()
    (data / "weights" / "w.safetensors").write_bytes(bytes(range(256)) * 64)
    (data / "raw" / "imagenet-r" / "downloads").mkdir(parents=True)
    (data / "raw" / "imagenet-r" / "downloads" / "imagenet-r.tar.part").write_bytes(b"half a download")
    shared = {k: v for k, v in tree(data).items() if not k.endswith(".part")}

    run(lab, *DVC, "commit", "-f", "data.dvc")
    recorded = (lab / "data.dvc").read_text()
    assert f"nfiles: {len(shared)}" in recorded  # the half-finished download is not tracked (.dvcignore)
    run(lab, *DVC, "remote", "add", "-d", "lab", str(tmp_path / "remote"))
    run(lab, *DVC, "push", "data.dvc")

    shutil.rmtree(data)
    shutil.rmtree(lab / ".dvc" / "cache")
    run(lab, *DVC, "pull", "data.dvc")
    assert tree(data) == shared
    assert "up to date" in run(lab, *DVC, "status", "data.dvc")
