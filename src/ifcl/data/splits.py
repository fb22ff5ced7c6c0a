"""Task splits: class order and the classes of each task (liangyanshuo/InfLoRA)."""
from __future__ import annotations

import numpy as np

from ..files import write_json
from .manifest import class_names_of, read_manifest


def make_tasks(class_names: list[str], num_tasks: int, class_order: str, seed: int) -> dict:
    """The content of ``tasks.json`` for one run.

    ``class_order = "native"`` keeps the dataset's label order (the official ``shuffle: false``, which every
    released config uses); ``"shuffled"`` is the official ``shuffle: true``: ``np.random.seed(seed)`` then
    ``np.random.permutation(C)`` (seed 1993 gives PyCIL's order 68, 56, 78, 8, ...). Tasks are consecutive equal
    blocks of the order; ``num_tasks`` must divide the number of classes.
    """
    n = len(class_names)
    if num_tasks < 1 or n % num_tasks:
        raise ValueError(f"num_tasks={num_tasks} does not divide the {n} classes")
    if class_order == "native":
        order = list(range(n))
    elif class_order == "shuffled":
        order = np.random.RandomState(seed).permutation(n).tolist()
    else:
        raise ValueError(f"unknown class_order {class_order!r}")
    m = n // num_tasks
    return {
        "num_tasks": num_tasks,
        "class_order": order,
        "tasks": [order[t * m : (t + 1) * m] for t in range(num_tasks)],
        "class_names": list(class_names),
    }


def write_tasks(train_csv: str, num_tasks: int, class_order: str, seed: int, out: str) -> None:
    names = class_names_of(read_manifest(train_csv))
    if len(names) % num_tasks:
        raise ValueError(f"num_tasks={num_tasks} does not divide the {len(names)} classes of {train_csv}")
    write_json(out, make_tasks(names, num_tasks, class_order, seed))
