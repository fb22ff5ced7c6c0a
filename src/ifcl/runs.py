"""A run on disk (``results/runs/<experiment>/seed<k>/``): its task folders and state files, and "the model after
task k" as a ready ``torch.nn.Module`` for one's own analysis.

    from ifcl.runs import load_model
    model = load_model("config/demo.yaml", "demo_inflora", seed=0, task=2)   # InfLoRA: a ViTLoRA, logits = model(x)

A DIKI run gives a :class:`ifcl.diki_chain.DIKIModel`: ``model(images, tokens)`` with the tokenised class prompts.
Every state file is checked against its recorded digest as it is read; nothing is ever unpickled.
"""
from __future__ import annotations

import re
from pathlib import Path

from .config import load_config
from .files import file_sha256
from .models.weights import backbone_weights_file
from .state import load_state

RUNS = Path("results") / "runs"


def run_dir(experiment: str, seed: int, root: str | Path = ".") -> Path:
    return Path(root) / RUNS / experiment / f"seed{seed}"


def task_folders(run: str | Path) -> list[tuple[int, Path]]:
    """(t, folder) of every ``task<t>`` folder of a run, in task order."""
    found = [(int(m.group(1)), p) for p in Path(run).iterdir() if p.is_dir() and (m := re.fullmatch(r"task(\d+)", p.name))]
    return sorted(found)


def describe_run(run: str | Path) -> list[dict]:
    """One row per file of the run: task (None for run-level files), file, bytes, sha256 of the file and, for
    state files, what they hold (``kind`` from their metadata). A state file whose tensors do not match its
    recorded digest raises :class:`ifcl.state.StateError` naming it."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"no run folder {run}")
    rows = [(None, p) for p in sorted(run.iterdir()) if p.is_file()]
    rows += [(t, p) for t, folder in task_folders(run) for p in sorted(folder.iterdir()) if p.is_file()]
    out = []
    for t, path in rows:
        kind = ""
        if path.suffix == ".safetensors":
            kind = str(load_state(path)[1].get("kind", ""))
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
    if spec["method"] == "diki":
        from .diki_chain import model_after_task as diki_model_after_task

        return diki_model_after_task(spec, backbone, str(weights), run, task)
    from .chain import model_after_task

    return model_after_task(backbone, weights, spec, run, task)
