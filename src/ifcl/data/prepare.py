"""A configured dataset's manifests, whatever its type: the one dispatcher by dataset type (the per-type modules
never import it)."""
from __future__ import annotations

from pathlib import Path

from .benchmarks import benchmark_manifests
from .folder import folder_manifests
from .generated import generated_manifests
from .manifest import class_names_of, write_manifest
from .mtil import mtil_manifests


def dataset_manifests(spec: dict, raw_root: str | Path, images_dir: str | Path | None) -> dict[str, list]:
    """{split: rows} of a dataset spec: generated images drawn into ``images_dir``, a user's folder tree, an InfLoRA
    benchmark or an MTIL dataset read from its sources under ``raw_root``."""
    if spec["type"] == "generated":
        return generated_manifests(images_dir, spec)
    if spec["type"] == "folder":
        return folder_manifests(spec["path"], spec["split"], spec.get("skip_unreadable", False))
    if spec["type"] == "mtil":
        return mtil_manifests(spec, raw_root, images_dir)
    return benchmark_manifests(spec, raw_root, images_dir)


def prepare_dataset(spec: dict, train_csv: str, test_csv: str, images_dir: str | None = None,
                    raw_root: str = "data/raw", val_csv: str | None = None) -> None:
    """Manifests of a configured dataset (generated and CIFAR images are written into ``images_dir`` first; the
    paper benchmarks are read from their sources under ``raw_root``, see ifcl.data.benchmarks)."""
    parts = dataset_manifests(spec, raw_root, images_dir)
    if images_dir is not None:
        Path(images_dir).mkdir(parents=True, exist_ok=True)  # a declared output, even when nothing is decoded
    write_manifest(train_csv, parts["train"])
    write_manifest(test_csv, parts["test"])
    if val_csv is not None:  # header only when the dataset has no validation split
        write_manifest(val_csv, parts.get("val", []))
    print(f"{len(class_names_of(parts['train']))} classes, {len(parts['train'])} train / {len(parts['test'])} test images")
