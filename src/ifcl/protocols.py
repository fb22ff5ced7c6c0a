"""The two protocols that own the shape of a run; every method belongs to one (:class:`ifcl.registry.Method`).

* **class-incremental** (``cil``): one dataset (``dataset``) split into ``num_tasks`` tasks of disjoint classes
  (``tasks.json``, rule ``split_tasks``); after task t the model is tested on every class seen, task-agnostic.
  Metrics A_T, Ā, forgetting, BWT (:func:`ifcl.metrics.cil_metrics`).
* **multi-domain task-incremental** (``mtil``): a sequence of datasets (``sequence``), one task each; after task t
  the model is tested on every dataset of the sequence, seen or not, beside the frozen model's zero-shot accuracy
  (rule ``frozen_features``). Metrics Transfer, Average, Last (:func:`ifcl.metrics.mtil_metrics`).

A protocol answers what a run of it is made of (its datasets, tasks, run-level files, the names of its tasks in
tables and figures); the aggregation (:mod:`ifcl.results`), summary tables and figures (:mod:`ifcl.plots`) read
these answers, never a method's name. No torch here: the workflow reads this module at every start.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import layout


@dataclass(frozen=True)
class Protocol:
    name: str  # "cil" | "mtil": the protocol's key in metrics.json, the summary and the figures
    title: str  # the summary table's heading
    schema: str  # the schema definition ($defs) of its experiments' common keys
    run_files: tuple[str, ...]  # files of a run beside its task folders and the aggregates

    def datasets(self, spec: dict) -> list[str]:
        """The datasets an experiment of this protocol learns (in order)."""
        return list(spec["sequence"]) if self.name == "mtil" else [spec["dataset"]]

    def num_tasks(self, spec: dict) -> int:
        return len(spec["sequence"]) if self.name == "mtil" else spec["num_tasks"]

    def task_labels(self, spec: dict) -> list[str]:
        """The names of a run's tasks in figures: MTIL's datasets; class-incremental "task 0", "task 1", ..."""
        return self.datasets(spec) if self.name == "mtil" else [f"task {t}" for t in range(spec["num_tasks"])]

    def matrix_labels(self, spec: dict) -> list[str] | None:
        """The rows and columns of a run's accuracy matrix: MTIL's datasets (class-incremental: numbered tasks)."""
        return self.datasets(spec) if self.name == "mtil" else None

    def has_forgetting(self, spec: dict) -> bool:
        """Whether the forgetting figure applies: class-incremental runs with old tasks to forget."""
        return self.name == "cil" and spec["num_tasks"] > 1

    def dataset_label(self, spec: dict) -> str:
        """The summary's dataset column: the dataset, or MTIL's sequence joined by " > "."""
        return " > ".join(self.datasets(spec))


CIL = Protocol("cil", "Class-incremental learning", "cil_experiment", (layout.TASKS,))
MTIL = Protocol("mtil", "Multi-domain task-incremental learning (MTIL, DIKI)", "mtil_experiment", ())
PROTOCOLS = {p.name: p for p in (CIL, MTIL)}
