import contextlib
import copy
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# The tiny config the pipeline tests share (built once per test session, see `tiny_run`): every method and every
# kind of rule the demo has, small enough for CI. Both backbones, a 2-block ViT and a tiny CLIP, are pretrained here
# on the same 8 generated classes. The class-incremental part: 6 other classes in 3 tasks; seq-lora with 2 seeds
# (shuffled orders), InfLoRA (DualGPM, one adapted block) and InfLoRA+CA (GPM, all blocks) with one. DIKI: two
# generated datasets, one task each, one seed.
TINY_CONFIG = {
    "datasets": {
        "tiny_shapes": {"type": "generated", "domain": "shapes", "classes": {"start": 0, "count": 6},
                        "train_per_class": 6, "test_per_class": 3, "image_size": 16, "seed": 0,
                        "train_transform": "random-resized-crop-flip", "test_transform": "resize"},
        "tc_pretrain": {"type": "generated",
                        "parts": [{"domain": "shapes", "start": 40, "count": 4},
                                  {"domain": "textures", "start": 40, "count": 4}],
                        "train_per_class": 6, "test_per_class": 2, "image_size": 16, "seed": 7,
                        "train_transform": "random-resized-crop-flip", "test_transform": "resize"},
        "tc_shapes": {"type": "generated", "domain": "shapes", "classes": {"start": 0, "count": 3},
                      "train_per_class": 8, "test_per_class": 3, "val_per_class": 2, "image_size": 16, "seed": 0,
                      "template": "a photo of a {}."},
        "tc_textures": {"type": "generated", "domain": "textures", "classes": {"start": 0, "count": 3},
                        "train_per_class": 8, "test_per_class": 3, "image_size": 16, "seed": 0,
                        "template": "a {} texture."},
    },
    "backbones": {
        "tiny_vit": {"type": "pretrain", "image_size": 16, "mean": [0, 0, 0], "std": [1, 1, 1],
                     "arch": {"patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2},
                     "pretrain": {"dataset": "tc_pretrain", "epochs": 1, "batch_size": 8, "lr": 1e-3,
                                  "weight_decay": 0.0, "seed": 0}},
        "tiny_clip": {"type": "pretrain_clip", "image_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                      "arch": {"embed_dim": 16, "vision": {"width": 32, "layers": 2, "patch_size": 8, "head_width": 16},
                               "text": {"width": 32, "heads": 2, "layers": 2, "context_length": 12}},
                      "pretrain": {"dataset": "tc_pretrain", "epochs": 1, "batch_size": 16, "lr": 0.001,
                                   "weight_decay": 0.0, "seed": 0, "template": "a photo of a {}."}},
    },
    "experiments": {
        "tiny_seq-lora": {"method": "seq-lora", "dataset": "tiny_shapes", "backbone": "tiny_vit", "seeds": [0, 1],
                          "num_tasks": 3, "class_order": "shuffled", "rank": 2, "lora_blocks": "all",
                          "train": {"optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0, "epochs": 1,
                                    "batch_size": 8, "schedule": "inflora-cosine"},
                          "task_overrides": {}, "eval_batch_size": 16},
        "tiny_inflora": {"method": "inflora", "dataset": "tiny_shapes", "backbone": "tiny_vit", "seeds": [0],
                         "num_tasks": 3, "class_order": "native", "rank": 2, "lora_blocks": [1],
                         "memory": "dualgpm", "lamb": 0.9, "lame": 1.0,
                         "train": {"optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0, "epochs": 1,
                                   "batch_size": 8, "schedule": "inflora-cosine"},
                         "task_overrides": {}, "eval_batch_size": 16},
        "tiny_inflora-ca": {"method": "inflora-ca", "dataset": "tiny_shapes", "backbone": "tiny_vit", "seeds": [0],
                            "num_tasks": 3, "class_order": "native", "rank": 2, "lora_blocks": "all",
                            "memory": "gpm", "lamb": 0.9, "lame": 1.0,
                            "train": {"optimizer": "sgd", "lr": 1e-2, "head_lr": 2e-2, "weight_decay": 0.0,
                                      "epochs": 1, "batch_size": 8, "schedule": "cosine"},
                            "task_overrides": {}, "eval_batch_size": 16,
                            "ca": {"samples_per_class": 16, "epochs": 2, "lr": 0.01, "momentum": 0.9,
                                   "weight_decay": 5e-4, "logit_norm": 0.1, "covariance_eps": 1e-4}},
        "tiny_diki": {"method": "diki", "sequence": ["tc_shapes", "tc_textures"], "backbone": "tiny_clip",
                      "seeds": [0], "prefix": {"depth_vision": 1, "depth_text": 1, "length": 4},
                      "train": {"optimizer": "sgd", "lr": 5.0, "final_lr_ratio": 0.001, "weight_decay": 0.0,
                                "epochs": 2, "batch_size": 8},
                      "rng": "per-task", "calibration": {"batchwise": True, "scale": None}, "eval_batch_size": 8},
        # the MTIL full fine-tuning family: WiSE-FT (Continual-FT with an interpolation), LwF-VR (LwF's distillation)
        "tiny_wise-ft": {"method": "wise-ft", "sequence": ["tc_shapes", "tc_textures"], "backbone": "tiny_clip",
                         "seeds": [0], "train": {"lr": [1e-4, 1e-4], "iterations": 5, "warmup": 2, "batch_size": 8},
                         "wise_alpha": 0.8, "eval_batch_size": 8},
        "tiny_lwf-vr": {"method": "lwf-vr", "sequence": ["tc_shapes", "tc_textures"], "backbone": "tiny_clip",
                        "seeds": [0], "train": {"lr": [1e-4, 1e-4], "iterations": 5, "warmup": 2, "batch_size": 8},
                        "vocabulary_size": 20, "vocabulary_length": 4, "eval_batch_size": 8},
        # ZSCL (reference images and texts: the pretraining set's images and class prompts) and iCaRL (6 exemplars)
        "tiny_zscl": {"method": "zscl", "sequence": ["tc_shapes", "tc_textures"], "backbone": "tiny_clip",
                      "seeds": [0], "train": {"lr": [1e-4, 1e-4], "iterations": 5, "warmup": 2, "batch_size": 8},
                      "reference": {"images": "tc_pretrain", "texts": "tc_pretrain"}, "average_every": 2,
                      "eval_batch_size": 8},
        "tiny_icarl": {"method": "icarl", "sequence": ["tc_shapes", "tc_textures"], "backbone": "tiny_clip",
                       "seeds": [0], "train": {"lr": [1e-4, 1e-4], "iterations": 5, "warmup": 2, "batch_size": 8},
                       "memory_size": 6, "candidates": 20, "eval_batch_size": 8},
        # MoE-Adapters: 4 experts (top-2) in every block of both towers, DDAS on a seeded random AlexNet (64-px
        # inputs: the tiny images are too small for AlexNet), the reference autoencoder on the pretraining set
        # (trained less than the tasks' ones, so that DDAS sends the test batches to a router)
        "tiny_moe-adapters": {"method": "moe-adapters", "sequence": ["tc_shapes", "tc_textures"],
                              "backbone": "tiny_clip", "seeds": [0],
                              "experts": {"count": 4, "top_k": 2, "bottleneck": 4, "routers": 2},
                              "train": {"lr": [1e-2, 1e-2], "iterations": 5, "warmup": 2, "batch_size": 8},
                              "ddas": {"extractor": "alexnet-random", "image_size": 64, "hidden": 4,
                                       "reference": "tc_pretrain", "reference_iterations": 4, "iterations": 10,
                                       "batch_size": 8, "lr": 0.05},
                              "eval_batch_size": 8},
    },
}
CIL_EXPERIMENTS = ("tiny_seq-lora", "tiny_inflora", "tiny_inflora-ca")
# What the session's tiny run must still hold when the session ends (tests that change files work on a copy).
RUN_OUTPUTS = ("data", "results")


def only(config: dict, *experiments: str) -> dict:
    """A copy of ``config`` with only the named experiments (every dataset and backbone kept)."""
    config = copy.deepcopy(config)
    config["experiments"] = {name: config["experiments"][name] for name in experiments}
    return config


@pytest.fixture
def tiny_config():
    return copy.deepcopy(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """TINY_CONFIG run through the workflow once per test session (`all`: every run, the summary and the figures),
    also when pytest-xdist runs the tests in several processes: the first to need it builds it, under a file lock,
    and the others wait for it. Tests only read it, or run Snakemake there without changing a file under data/ or
    results/ (a dry run, a run with nothing to do, a report); a test that changes files works on `copy_of_tiny_run`.
    At the end of the session every file of data/ and results/ is checked to be as the build left it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's folder, also under xdist
    workdir, built_file = shared / "tiny_run", shared / "tiny_run.json"
    with FileLock(str(shared / "tiny_run.lock")):
        if not built_file.exists():
            proc = snakemake(workdir, TINY_CONFIG, check=False)
            failure = None if proc.returncode == 0 else f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
            built_file.write_text(json.dumps({"failure": failure, "tree": tree(workdir, *RUN_OUTPUTS)}))
        built = json.loads(built_file.read_text())
    if built["failure"]:
        raise AssertionError(f"the tiny run failed:\n{built['failure']}")
    yield workdir
    changed = sorted(set(built["tree"].items()) ^ set(tree(workdir, *RUN_OUTPUTS).items()))
    assert not changed, f"a test changed the shared tiny run (it must work on a copy): {sorted({p for p, _ in changed})}"


@pytest.fixture
def copy_of_tiny_run(tiny_run, tmp_path):
    """A copy of the session's tiny run (files, timestamps, Snakemake's metadata and logs) that a test may change."""
    return copy_run(tiny_run, tmp_path / "tiny_run")


def copy_run(workdir: Path, to: Path) -> Path:
    """A copy of a workflow's working directory, without the locks of a Snakemake run that may be going on there."""
    shutil.copytree(workdir, to, symlinks=True, ignore=shutil.ignore_patterns("locks"))
    return to


# The order of the tests, and how pytest-xdist shares them out between its processes (`-n 2 --dist loadscope
# --no-loadscope-reorder` in pyproject.toml): the modules that read the session's tiny run go first, and together
# to one process, which builds the run and then reads it; meanwhile the SLURM cluster, the longest module (mostly
# waiting for its jobs), goes to the other; then the DVC project, then the rest. The tests of the whole demo
# (`-m demo`) are one unit too: each runs the demo on both cores, so they run one at a time.
TINY_RUN_MODULES = ("test_pipeline.py", "test_diki_pipeline.py", "test_config_audit.py", "test_integrity.py",
                    "test_predict.py", "test_status.py")
FIRST_MODULES = (*TINY_RUN_MODULES, "test_slurm.py", "test_reproducibility.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: FIRST_MODULES.index(item.path.name) if item.path.name in FIRST_MODULES
               else len(FIRST_MODULES))


def pytest_xdist_make_scheduler(config, log):
    """--dist loadscope, with the tiny run's modules as one unit of work, and the demo's tests as another."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
            if module in TINY_RUN_MODULES:
                return "the tiny run"
            if module == "test_demo.py" or nodeid.endswith("[demo]"):
                return "the demo"
            return super()._split_scope(nodeid)

    return SharedRunsTogether(config, log)


def snakemake(workdir: Path, config: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the repository's workflow in ``workdir`` with ``config`` (written to workdir/config.yaml)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "config.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2",
           *args, "--configfile", str(cfg)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def tree(root: Path, *folders: str) -> dict[str, str]:
    """sha256 of every file under the given folders of root (default: all of it), by path relative to root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders or (".",) for p in sorted((root / folder).rglob("*")) if p.is_file()}


def changed(config: dict, changes: dict) -> dict:
    config = copy.deepcopy(config)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = config
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = copy.deepcopy(value)
    return config


def scheduled_rules(workdir, configfile) -> set[str]:
    """The rules a dry run of `all` schedules in ``workdir`` (Snakemake run in this process: ~0.5 s each)."""
    from snakemake.cli import main

    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        try:
            main(["-s", str(REPO / "Snakefile"), "-d", str(workdir), "-n", "--quiet", "rules", "--nolock", "all",
                  "--configfile", str(configfile)])
            code = 0
        except SystemExit as e:
            code = e.code
    text = out.getvalue()
    assert code == 0, text[-3000:]
    return set(re.findall(r"^(\w+)\s+\d+$", text, re.M)) - {"all", "total"}
