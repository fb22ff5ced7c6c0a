"""What every class-incremental rule chain's steps share: a task's image batches, and the evaluation after task t
(arg-max over every seen class, one accuracy per seen task: a row of the accuracy matrix)."""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..data.loader import image_batches
from ..files import write_json
from ..training import per_task_accuracy, predict_logits, task_aware_predictions, task_of


def task_loader(manifest: str, classes, tasks: dict, dataset: dict, backbone: dict, train: bool, batch_size: int,
                device, seed: int = 0, decoded: str | None = None, workers: int = 0, transform: str | None = None,
                drop_last: bool = False):
    """Batches on ``device`` of the manifest's images of ``classes``: ``train``: the training transform, shuffled;
    else the test transform in manifest order; ``transform``: that key of ``dataset`` instead (``test_transform``
    for a shuffled pass without augmentation). ``decoded``: read from that decoded-image cache. ``drop_last``:
    without the last partial batch."""
    name = dataset[transform or ("train_transform" if train else "test_transform")]
    return image_batches(manifest, classes, tasks["class_order"], name, backbone, batch_size, shuffle=train,
                         seed=seed, device=device, crop_scale=dataset["crop_scale"], decoded=decoded, workers=workers,
                         drop_last=drop_last)


def seen_classes(tasks: dict, t: int) -> list:
    return [c for task in tasks["tasks"][: t + 1] for c in task]


def evaluate_seen(logits_fn: Callable[[torch.Tensor], torch.Tensor], tasks: dict, t: int, manifest: str,
                  dataset: dict, backbone: dict, batch_size: int, device, precision: str, out: str,
                  decoded: str | None = None, workers: int = 0) -> None:
    """Class-incremental evaluation after task t: arg-max of ``logits_fn`` (every seen class, task blocks in order)
    on the test images of all seen classes (task-agnostic); one accuracy per seen task, the task-aware accuracies
    and the task-identification accuracy, written to ``out`` (eval.json)."""
    loader = task_loader(manifest, seen_classes(tasks, t), tasks, dataset, backbone, False, batch_size, device,
                         decoded=decoded, workers=workers)
    begin = time.perf_counter()
    logits, targets = predict_logits(logits_fn, loader, device, precision)
    sizes = [len(c) for c in tasks["tasks"][: t + 1]]
    preds = logits.argmax(1)
    accs, counts = per_task_accuracy(preds, targets, sizes)
    til_accs, _ = per_task_accuracy(task_aware_predictions(logits, targets, sizes), targets, sizes)
    total = 100.0 * float((preds == targets).float().mean())
    task_id = 100.0 * float((task_of(preds, sizes) == task_of(targets, sizes)).float().mean())
    print(f"after task {t}: accuracy {total:.2f}% on {len(targets)} images; per task "
          f"{[round(a, 2) for a in accs]}; task-aware per task {[round(a, 2) for a in til_accs]}; task-id accuracy "
          f"{task_id:.2f}% ({time.perf_counter() - begin:.1f} s)")
    write_json(out, {"task": t, "accuracy": total, "per_task_accuracy": accs, "per_task_count": counts,
                     "per_task_accuracy_task_aware": til_accs, "task_id_accuracy": task_id})
