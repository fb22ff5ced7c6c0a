import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# A complete config small enough for CI: 6 generated classes in 3 tasks, 2 seeds, a 2-block ViT.
TINY_CONFIG = {
    "datasets": {
        "tiny_pretrain": {"type": "generated", "domain": "shapes", "classes": {"start": 40, "count": 4},
                          "train_per_class": 6, "test_per_class": 2, "image_size": 16, "seed": 7,
                          "train_transform": "random-resized-crop-flip", "test_transform": "resize"},
        "tiny_shapes": {"type": "generated", "domain": "shapes", "classes": {"start": 0, "count": 6},
                        "train_per_class": 6, "test_per_class": 3, "image_size": 16, "seed": 0,
                        "train_transform": "random-resized-crop-flip", "test_transform": "resize"},
    },
    "backbones": {
        "tiny_vit": {"type": "pretrain", "image_size": 16, "mean": [0, 0, 0], "std": [1, 1, 1],
                     "arch": {"patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2},
                     "pretrain": {"dataset": "tiny_pretrain", "epochs": 1, "batch_size": 8, "lr": 1e-3,
                                  "weight_decay": 0.0, "seed": 0}},
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
    },
}


# DIKI on a tiny CLIP pretrained here: two generated datasets (one task each), one seed.
TINY_DIKI_CONFIG = {'datasets': {'tc_pretrain': {'type': 'generated',
                              'parts': [{'domain': 'shapes', 'start': 40, 'count': 4},
                                        {'domain': 'textures', 'start': 40, 'count': 4}],
                              'train_per_class': 6,
                              'test_per_class': 2,
                              'image_size': 16,
                              'seed': 7,
                              'train_transform': 'random-resized-crop-flip',
                              'test_transform': 'resize'},
              'tc_shapes': {'type': 'generated',
                            'domain': 'shapes',
                            'classes': {'start': 0, 'count': 3},
                            'train_per_class': 8,
                            'test_per_class': 3,
                            'val_per_class': 2,
                            'image_size': 16,
                            'seed': 0,
                            'template': 'a photo of a {}.'},
              'tc_textures': {'type': 'generated',
                              'domain': 'textures',
                              'classes': {'start': 0, 'count': 3},
                              'train_per_class': 8,
                              'test_per_class': 3,
                              'image_size': 16,
                              'seed': 0,
                              'template': 'a {} texture.'}},
 'backbones': {'tiny_clip': {'type': 'pretrain_clip',
                             'image_size': 16,
                             'mean': [0.5, 0.5, 0.5],
                             'std': [0.25, 0.25, 0.25],
                             'arch': {'embed_dim': 16,
                                      'vision': {'width': 32, 'layers': 2, 'patch_size': 8, 'head_width': 16},
                                      'text': {'width': 32, 'heads': 2, 'layers': 2, 'context_length': 12}},
                             'pretrain': {'dataset': 'tc_pretrain',
                                          'epochs': 1,
                                          'batch_size': 16,
                                          'lr': 0.001,
                                          'weight_decay': 0.0,
                                          'seed': 0,
                                          'template': 'a photo of a {}.'}}},
 'experiments': {'tiny_diki': {'method': 'diki',
                               'sequence': ['tc_shapes', 'tc_textures'],
                               'backbone': 'tiny_clip',
                               'seeds': [0],
                               'prefix': {'depth_vision': 1, 'depth_text': 1, 'length': 4},
                               'train': {'optimizer': 'sgd',
                                         'lr': 5.0,
                                         'final_lr_ratio': 0.001,
                                         'weight_decay': 0.0,
                                         'epochs': 2,
                                         'batch_size': 8},
                               'rng': 'per-task',
                               'calibration': {'batchwise': True, 'scale': None},
                               'eval_batch_size': 8}}}


@pytest.fixture
def tiny_config():
    return copy.deepcopy(TINY_CONFIG)


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
