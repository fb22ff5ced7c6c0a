"""The pipeline's steps, one module per method (and one for pretraining): each step is a function of one typed
description built from its rule (:func:`ifcl.runtime.from_rule`), called by the rule's script."""
from __future__ import annotations

import importlib


def steps_of(experiment: dict):
    """The steps module of an experiment's method family (:data:`ifcl.layout.FAMILIES`), imported when asked for:
    it has ``model_after_task`` and, for the class-incremental families, ``evaluate_run``."""
    from ..layout import family

    return importlib.import_module(f"{__name__}.{family(experiment)}")
