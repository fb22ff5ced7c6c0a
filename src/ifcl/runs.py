"""A run on disk (``results/runs/<experiment>/seed<k>/``): its task folders and state files, and "the model after
task k" as a ready ``torch.nn.Module`` for one's own analysis.

    from ifcl.runs import load_model
    model = load_model("config/demo.yaml", "demo_inflora", seed=0, task=2)   # InfLoRA: a ViTLoRA, logits = model(x)

A DIKI run gives a :class:`ifcl.models.diki.DIKIModel`: ``model(images, tokens)`` with the tokenised class prompts.
Every state file is checked against its recorded digest as it is read; nothing is ever unpickled.
"""
from __future__ import annotations

from pathlib import Path

from .config import load_config
from .files import DIGEST_SUFFIX, check_bytes, file_sha256
from .layout import RUNS, SUMMARY, run_dir, task_folders
from .models.weights import backbone_weights_file
from .state import load_state


def describe_run(run: str | Path) -> list[dict]:
    """One row per file of the run: task (None for run-level files), file, bytes, sha256 of the file and, for
    state files, what they hold (``kind`` from their metadata). Every file is checked: a state file whose tensors
    do not match its recorded digest raises :class:`ifcl.state.StateError`, a text file that does not match the
    digest beside it (or has none) :class:`ifcl.files.FileCheckError`, naming it."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"no run folder {run}")

    def files(folder: Path) -> list[Path]:
        return [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.endswith(DIGEST_SUFFIX)]

    rows = [(None, p) for p in files(run)]
    rows += [(t, p) for t, folder in task_folders(run) for p in files(folder)]
    out = []
    for t, path in rows:
        kind = ""
        if path.suffix == ".safetensors":
            kind = str(load_state(path)[1].get("kind", ""))
        else:
            check_bytes(path, path.read_bytes())
        out.append({"task": t, "file": str(path.relative_to(run)), "bytes": path.stat().st_size,
                    "sha256": file_sha256(path), "kind": kind})
    return out


def load_model(config: str | Path | dict, experiment: str, seed: int, task: int, root: str | Path = "."):
    """The model after task ``task`` of run (``experiment``, ``seed``), built from its per-task files under
    ``root`` (the working directory the pipeline ran in) and the config the run was made with. Eval mode, CPU."""
    config = load_config(config, root)
    if experiment not in config["experiments"]:
        raise KeyError(f"experiment {experiment!r} is not in the config (it has {', '.join(sorted(config['experiments']))})")
    spec = config["experiments"][experiment]
    backbone_name = spec["backbone"]
    backbone = config["backbones"][backbone_name]
    weights = Path(root) / backbone_weights_file(backbone_name, backbone)
    run = run_dir(experiment, seed, root)
    tasks = [t for t, _ in task_folders(run)] if run.is_dir() else []
    if task not in tasks:
        raise FileNotFoundError(f"{run}: no task{task} folder (tasks present: {tasks or 'none'})")
    from .registry import implementation  # a method's steps are imported only when its model is asked for

    return implementation(spec).model_after_task(spec, backbone, weights, run, task)


def compare_workdirs(a: str | Path, b: str | Path, runs: list[str] | None = None) -> list[tuple[str, str]]:
    """(path, "identical" | "differs" | "missing in A" | "missing in B") for the summary tables and every file of
    the given runs (``<experiment>/seed<k>``; default: every run under A) of two pipeline working directories."""
    a, b = Path(a), Path(b)
    runs = runs or sorted(f"{p.parent.name}/{p.name}" for p in (a / RUNS).glob("*/seed*") if p.is_dir())
    paths = set()
    for root in (a, b):
        folders = [root / SUMMARY] + [root / RUNS / r for r in runs]
        paths |= {str(p.relative_to(root)) for f in folders if f.is_dir() for p in f.rglob("*") if p.is_file()}
    rows = []
    for path in sorted(paths):
        fa, fb = a / path, b / path
        if not fa.is_file() or not fb.is_file():
            rows.append((path, "missing in A" if not fa.is_file() else "missing in B"))
        else:
            rows.append((path, "identical" if file_sha256(fa) == file_sha256(fb) else "differs"))
    return rows
