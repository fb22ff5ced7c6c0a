""""The model after task k" of a run on a user's images (``ifcl run predict``) and its accuracy on a manifest
(``ifcl run evaluate``), computed as the run's evaluation computes eval.json. Both run in the pipeline's working
directory (manifests list image paths relative to it), with the config the run was made with.

- :func:`predict`: the images (:func:`image_paths`: folders searched recursively for image files, image paths, text
  files listing paths) go through the experiment's test-time transform (``test_transform``; CLIP's preprocessing
  for DIKI) in batches of the experiment's ``eval_batch_size``, in the order given, on the device and in the
  precision of the evaluation. Class-incremental runs: arg-max over the classes of tasks 0..k, class names from the
  run's tasks.json. DIKI: per batch, the task from the frozen features under the Gaussians of tasks 0..k (batch-wise
  majority vote, or per image, as the experiment's ``calibration`` says) and λ per image; the classes are those of
  the chosen task's dataset (or of one named dataset of the sequence), with its prompt template, as the evaluation
  uses them for that dataset's test images. The score is the softmax probability of the prediction (for DIKI over
  the CLIP logits, the cosine similarities times CLIP's logit scale, as in training).
- :func:`evaluate`: the pipeline's own evaluation step (:func:`ifcl.steps.inflora.evaluate`,
  :func:`ifcl.steps.diki.evaluate`) on the run's files, as its rule runs it (the images read from their files: a
  decoded-image cache holds the same inputs), with its eval.json written to a temporary folder: on the run's test
  set it gives the figures of the run's eval.json, bit for bit for a run made on the CPU (CPU runs are
  bit-reproducible).
"""
from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

from . import layout
from .config import load_config
from .data.loader import DeviceBatches, make_loader
from .data.manifest import IMAGE_SUFFIXES, DatasetError, read_manifest, write_manifest
from .data.transforms import make_transform, read_image
from .files import read_json, recorded_digest
from .models.weights import backbone_weights_file
from .registry import protocol_of
from .runtime import pick_device

PREDICTION_COLUMNS = ("path", "predicted_class", "score")
DIKI_COLUMNS = ("task", "task_dataset", "lambda")  # the chosen task, its dataset, the calibration weight λ


# ---- the run ----

def _experiment(config: str | Path | dict, experiment: str, seed: int, task: int) -> tuple[dict, dict, Path]:
    """(config, experiment spec, run folder), the run checked to have a task<task> folder."""
    config = load_config(config)
    if experiment not in config["experiments"]:
        known = ", ".join(sorted(config["experiments"]))
        raise KeyError(f"experiment {experiment!r} is not in the config (it has {known})")
    run = layout.run_dir(experiment, seed)
    tasks = [t for t, _ in layout.task_folders(run)] if run.is_dir() else []
    if task not in tasks:
        raise FileNotFoundError(f"{run}: no task{task} folder (tasks present: {tasks or 'none'})")
    return config, config["experiments"][experiment], run


# ---- a user's images ----

def image_paths(sources: list[str | Path]) -> list[str]:
    """The images named by ``sources``, in order: a folder gives its image files (by suffix, recursively, sorted),
    a file with an image suffix itself, a CSV whose header starts with ``path`` (a manifest) its first column, any
    other file the paths it lists (one per line; blank lines and lines starting with # skipped). Relative paths are
    relative to the current directory, like those given directly."""
    paths: list[str] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {source}")
            paths += [str(p) for p in found]
        elif not source.is_file():
            raise FileNotFoundError(f"no such image, folder or list file: {source}")
        elif source.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(str(source))
        elif (text := _list_text(source)).startswith("path,"):  # a manifest (or any CSV with a path column first)
            paths += [row[0] for row in list(csv.reader(io.StringIO(text, newline="")))[1:] if row]
        else:
            lines = [line.strip() for line in text.splitlines()]
            paths += [line for line in lines if line and not line.startswith("#")]
    if not paths:
        raise FileNotFoundError(f"no images in {', '.join(map(str, sources))}")
    return paths


def _list_text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError as e:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DatasetError(f"{path}: neither an image ({suffixes}) nor a text file listing images") from e


class ImageFiles(Dataset):
    """Image files under a transform; the target of an image is its position in ``paths``."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(read_image(self.paths[i])), i


def image_file_batches(paths: list[str], transform: str, image: dict, batch_size: int, device,
                       crop_scale=(0.08, 1.0)) -> DeviceBatches:
    """Batches of the images on ``device``, in order, under the named transform at ``image['image_size']``,
    normalised with ``image['mean']`` / ``image['std']``: what :func:`ifcl.data.loader.image_batches` makes of a
    manifest's images. An unreadable image raises :class:`DatasetError` naming it when its batch is read."""
    dataset = ImageFiles(paths, make_transform(transform, image["image_size"], image["mean"], image["std"], crop_scale))
    return DeviceBatches(make_loader(dataset, batch_size, shuffle=False), device, lambda x: x)


# ---- predictions ----

def class_incremental_predictions(model, loader, class_names: list[str], device, precision: str) -> list[dict]:
    """Arg-max over every seen class (as :func:`ifcl.steps.inflora.evaluate` takes it) and its softmax probability."""
    from .training import predict_logits

    logits, index = predict_logits(model, loader, device, precision)
    pred = logits.argmax(1)
    score = logits.softmax(1).gather(1, pred[:, None])[:, 0]
    return [{"image": int(i), "predicted_class": class_names[int(c)], "score": float(s)}
            for i, c, s in zip(index, pred, score)]


def predict(config: str | Path | dict, experiment: str, seed: int, task: int, sources: list[str | Path],
            batch_size: int | None = None, dataset: str | None = None) -> list[dict]:
    """One row per image of ``sources`` (:func:`image_paths`), in order: path, predicted class name, score and, for
    DIKI, the chosen task, its dataset and λ. ``batch_size``: default the experiment's ``eval_batch_size`` (under
    DIKI's batch-wise calibration the batches decide the task, as in the evaluation). ``dataset`` (DIKI): classify
    among the classes of that dataset of the sequence (seen or not, as the evaluation does) whatever the task chosen."""
    from .runs import load_model

    config, spec, run = _experiment(config, experiment, seed, task)
    paths = image_paths(sources)
    backbone = config["backbones"][spec["backbone"]]
    batch_size = batch_size or spec["eval_batch_size"]
    model = load_model(config, experiment, seed, task)
    device = pick_device()
    model = model.to(device)
    if protocol_of(spec).name == "mtil":  # the method's own inference (its steps module's `predictions`)
        from .registry import implementation

        loader = image_file_batches(paths, "clip", backbone, batch_size, device)  # CLIP's preprocessing
        rows = implementation(spec).predictions(config, spec, model, loader, device, dataset)
    else:
        if dataset is not None:
            raise KeyError(f"{experiment} is a class-incremental run: it has no choice of dataset")
        tasks = read_json(run / layout.TASKS)
        seen = sum(len(c) for c in tasks["tasks"][: task + 1])
        names = [tasks["class_names"][label] for label in tasks["class_order"][:seen]]
        data = config["datasets"][spec["dataset"]]
        loader = image_file_batches(paths, data["test_transform"], backbone, batch_size, device, data["crop_scale"])
        rows = class_incremental_predictions(model, loader, names, device, spec["gpu_precision"])
    return [{"path": paths[r.pop("image")], **r} for r in rows]


def write_predictions(path: str | Path, rows: list[dict]) -> None:
    """The rows as CSV: path, predicted_class, score (and task, task_dataset, lambda for DIKI)."""
    columns = PREDICTION_COLUMNS + (DIKI_COLUMNS if rows and "task" in rows[0] else ())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(buf.getvalue())


# ---- accuracy on a manifest ----

def _manifest_to_read(manifest: str, folder: str) -> str:
    """``manifest`` itself where it has a recorded digest (it is checked as it is read); a user's own CSV without
    one (columns path,label,class_name) as a checked copy in ``folder``."""
    if recorded_digest(manifest) is not None:
        return manifest
    reader = csv.reader(io.StringIO(Path(manifest).read_text(), newline=""))
    header = next(reader, None) or []
    if tuple(header[:3]) != ("path", "label", "class_name"):
        raise DatasetError(f"{manifest}: not a manifest (header {header}, expected path,label,class_name)")
    try:
        rows = [(row[0], int(row[1]), row[2]) for row in reader if row]
    except (IndexError, ValueError) as e:
        raise DatasetError(f"{manifest}: a row without path, integer label and class name ({e})") from e
    copy = str(Path(folder) / "manifest.csv")
    write_manifest(copy, rows)
    return copy


def _check_class_names(manifest: str, class_names: list[str]) -> None:
    """Every label of the manifest names the run's class of that label (class-incremental runs)."""
    for path, label, name in read_manifest(manifest):
        if not 0 <= label < len(class_names) or class_names[label] != name:
            known = repr(class_names[label]) if 0 <= label < len(class_names) else "no class"
            raise DatasetError(f"{manifest}: {path} has label {label} {name!r}, which is {known} in the run")


def evaluate(config: str | Path | dict, experiment: str, seed: int, task: int,
             manifest: str | None = None) -> tuple[dict, dict | None, list[str]]:
    """(the evaluation after task ``task``, the run's eval.json or None, what was evaluated): the pipeline's
    evaluation step on the run's files. Without ``manifest`` on the run's test set (class-incremental: the test
    images of the classes seen through ``task``; DIKI: every dataset of the sequence); with it on that manifest's
    images (class-incremental: those of the seen classes, labelled as the run's data labels them; DIKI: one
    dataset, its prompts with the template of the sequence's dataset of the same classes, else the default)."""
    config, spec, run = _experiment(config, experiment, seed, task)
    threads = torch.get_num_threads()  # the step sets the rule's (1); given back afterwards
    try:
        with tempfile.TemporaryDirectory(prefix="ifcl-evaluate-") as tmp:
            readable = None if manifest is None else _manifest_to_read(manifest, tmp)
            step = _mtil_evaluation if protocol_of(spec).name == "mtil" else _class_incremental_evaluation
            step(config, spec, run, task, readable, tmp)
            result = read_json(f"{tmp}/{layout.EVAL}")
    finally:
        torch.set_num_threads(threads)
    recorded = read_json(layout.in_run(run, task, layout.EVAL)) if manifest is None else None
    evaluated = [manifest] if manifest is not None else protocol_of(spec).datasets(spec)
    return result, recorded, evaluated


def _task_files(run: Path, task: int, name: str) -> list[str]:
    """File ``name`` of tasks 0..task of the run."""
    return [str(layout.in_run(run, s, name)) for s in range(task + 1)]


def _class_incremental_evaluation(config: dict, spec: dict, run: Path, task: int, manifest: str | None,
                                  tmp: str) -> None:
    """The evaluation rule's step of the experiment's method on the run's files (its steps module's
    ``evaluate_run``); its eval.json in ``tmp``."""
    from .registry import implementation

    if manifest is not None:
        _check_class_names(manifest, read_json(run / layout.TASKS)["class_names"])
    backbone = config["backbones"][spec["backbone"]]
    implementation(spec).evaluate_run(spec, backbone, backbone_weights_file(spec["backbone"], backbone),
                                config["datasets"][spec["dataset"]], run, task,
                                manifest or layout.manifest_file(spec["dataset"], "test"), f"{tmp}/{layout.EVAL}")


def _mtil_evaluation(config: dict, spec: dict, run: Path, task: int, manifest: str | None, tmp: str) -> None:
    """The evaluation rule's step of the experiment's method on the run's files (its steps module's
    ``evaluate_run``); its eval.json in ``tmp``."""
    from .registry import implementation, model_settings

    implementation(spec).evaluate_run(config, spec, model_settings(spec), run, task, manifest, tmp)


# ---- what the commands print ----

def prediction_summary(rows: list[dict]) -> list[str]:
    """Images per predicted class (and, for DIKI, per chosen task with its mean λ)."""
    lines = [f"{len(rows)} images"]
    classes = sorted({r["predicted_class"] for r in rows})
    counts = {c: sum(r["predicted_class"] == c for r in rows) for c in classes}
    lines.append("predicted: " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1])))
    if rows and "task" in rows[0]:
        for name in sorted({r["task_dataset"] for r in rows}):
            chosen = [r["lambda"] for r in rows if r["task_dataset"] == name]
            lines.append(f"task {name}: {len(chosen)} images, mean λ {sum(chosen) / len(chosen):.3f}")
    return lines


def evaluation_lines(result: dict, recorded: dict | None, evaluated: list[str]) -> list[str]:
    """The accuracy (per dataset for DIKI), beside eval.json's, and whether every figure equals eval.json's."""
    def accuracy(value: float, was: float | None) -> str:
        return f"{value:.2f}%" + ("" if was is None else f" (eval.json {was:.2f}%)")

    lines = []
    if isinstance(result["accuracy"], list):  # MTIL: one accuracy per dataset (DIKI: and its mean λ)
        was = recorded["accuracy"] if recorded else [None] * len(result["accuracy"])
        weights = result.get("mean_weight") or [None] * len(result["accuracy"])
        for name, value, prior, weight in zip(evaluated, result["accuracy"], was, weights):
            lines.append(f"{name}: accuracy {accuracy(value, prior)}"
                         + ("" if weight is None else f", mean λ {weight:.3f}"))
    else:
        was = recorded["accuracy"] if recorded else None
        lines.append(f"{', '.join(evaluated)}: accuracy {accuracy(result['accuracy'], was)} on "
                     f"{sum(result['per_task_count'])} images; per task "
                     f"{[round(a, 2) for a in result['per_task_accuracy']]}")
    if recorded is not None:
        differ = [key for key in result if result[key] != recorded.get(key)]
        lines.append("every figure equals the run's eval.json" if not differ
                     else f"differs from the run's eval.json in: {', '.join(differ)}")
    return lines
