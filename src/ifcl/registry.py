"""The methods ifcl knows: each declared once, by a :class:`Method` record in its own declaration module.

ifcl's own methods are declared in the modules of :mod:`ifcl.catalog` (found by listing that package); a method
in any installed package joins through a Python entry point of group ``ifcl.methods`` whose value is a
:class:`Method` or a sequence of them::

    [project.entry-points."ifcl.methods"]
    my-method = "my_package.method:METHOD"

Every layer reads the records: the workflow (which rules an experiment's tasks run, its per-task files, the
rules' ``model`` and ``code`` parameters), the config schema and its docs, the aggregation, summary, figures,
``ifcl status`` and ``ifcl run model/predict/evaluate``. Nothing outside a method's own modules and its
protocol tests a method's name.

A declaration module imports no torch (the workflow reads every declaration at each start); a record names its
implementation by module path (``steps``, ``model``), imported only by the jobs that run it. The rules' code
digest of a job is that of its rule's script plus that of its method's implementation modules
(:func:`method_code`), so an edit to one method's modules re-runs that method's jobs and no other's.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Callable

from . import layout
from .protocols import PROTOCOLS, Protocol
from .settings import properties, required

ENTRY_POINT_GROUP = "ifcl.methods"

# The rule chains a method's tasks can run, by protocol (workflow/rules/<file>): "state" is the generic one.
CHAINS = {
    "cil": {
        # per task t: train_state (task t's state.safetensors from those of tasks 0..t-1) -> evaluate_state
        "state": "state.smk",
        # InfLoRA's: reduction -> train_task (-> memory) (-> class_stats -> align) -> evaluate_task
        "lora": "tasks.smk",
    },
    # DIKI's: gaussian, train_prefix -> evaluate_diki, beside the protocol's frozen features
    # the full fine-tuning family's (ZSCL's code): train_finetune (from the previous task's weights) -> evaluate_finetune
    # MoE-Adapters': train_moe (from the previous task's experts and routers), train_autoencoder,
    # train_reference_autoencoder -> evaluate_moe
    "mtil": {"prefix": "diki.smk", "finetune": "finetune.smk", "moe": "moe.smk"},
}
STATE_STEPS = "ifcl.steps.state"  # the state chain's steps, shared by its methods

# What the figures and `ifcl status` read of a task's train_log.csv, and the column that holds it in the logs of
# ifcl.training.train_classifier (a method whose log names them otherwise maps them in ``Method.log_fields``).
LOG_COLUMNS = {"epoch": "epoch", "loss": "loss", "accuracy": "train_acc"}


def state_files(spec: dict, t: int) -> tuple[str, ...]:
    """The files of task t in the ``state`` chain: the task's state, its training log, its evaluation."""
    return layout.STATE, layout.TRAIN_LOG, layout.EVAL


@dataclass(frozen=True)
class Method:
    """One method, as the config names it (``experiments.<name>.method``)."""

    name: str  # the config's `method`
    protocol: str  # "cil" or "mtil" (ifcl.protocols)
    title: str  # for tables, figures and docs ("InfLoRA+CA")
    description: str  # one paragraph for the schema and config/README.md, citing the official code
    chain: str = "state"  # the rule chain of its protocol that its tasks run (CHAINS)
    # "state" chain: "module:function" building the model before task 0 from (model settings, frozen ViT, seed)
    model: str | None = None
    # "state" chain: the transform of the task's training pass: train_transform (augmented, for an optimiser) or
    # test_transform (for a model whose `fit_task` fits statistics in closed form)
    task_images: str = "train_transform"
    # "state" chain: whether the task's training loader drops its last partial batch, as the official one does
    drop_last: bool = False
    # "state" chain: the transform of a pass over the task's training images after training (in manifest order, last
    # batch kept) that the model's `finish_task(batches, known, train_batches)` reads (class statistics, prototypes, alignment); None: none
    statistics_images: str | None = None
    # other chains: the module with the chain's step functions, `model_after_task` and (cil) `evaluate_run`
    steps: str = STATE_STEPS
    settings: type | None = None  # its own experiment keys: a settings dataclass (ifcl.settings)
    model_keys: tuple[str, ...] = ()  # experiment keys that shape its model (the rules' `model` parameter)
    task_files: Callable[[dict, int], tuple[str, ...]] | None = None  # files of task t (default: its chain's)
    check: Callable[[str, dict, dict], None] | None = None  # (key, experiment, config): raise ConfigError
    run_figures: Callable[[dict], tuple[str, ...]] | None = None  # extra per-run figures ("memory", "lambda")
    log_fields: dict = field(default_factory=dict)  # LOG_COLUMNS name -> its train_log.csv column, where it differs
    # configured datasets its runs read beside those its protocol learns (ZSCL's reference images and texts)
    reference_datasets: Callable[[dict], tuple[str, ...]] | None = None
    # files under data/weights/ its runs read beside their backbone's (MoE-Adapters' AlexNet), fetched by their rule
    weights_read: Callable[[dict], tuple[str, ...]] | None = None
    group: str = ""  # its settings' section in config/README.md and the config audit (default: its name; variants
    # of one declaration share one)

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"method {self.name!r}: protocol {self.protocol!r} is not one of {sorted(PROTOCOLS)}")
        if self.chain not in CHAINS[self.protocol]:
            raise ValueError(f"method {self.name!r}: chain {self.chain!r} is not one of the {self.protocol} "
                             f"protocol's ({', '.join(CHAINS[self.protocol])})")
        if self.chain == "state" and not self.model:
            raise ValueError(f"method {self.name!r}: the state chain needs `model` (module:function)")
        if self.task_images not in ("train_transform", "test_transform"):
            raise ValueError(f"method {self.name!r}: task_images is train_transform or test_transform")
        if self.statistics_images not in (None, "train_transform", "test_transform"):
            raise ValueError(f"method {self.name!r}: statistics_images is train_transform, test_transform or None")
        if self.chain != "state" and (self.steps == STATE_STEPS or self.task_files is None):
            raise ValueError(f"method {self.name!r}: the {self.chain} chain needs `steps` (its steps module) and "
                             f"`task_files`")

    def datasets_read(self, spec: dict) -> tuple[str, ...]:
        """The configured datasets an experiment of this method reads beside those its protocol learns."""
        return tuple(self.reference_datasets(spec)) if self.reference_datasets else ()

    def weights(self, spec: dict) -> tuple[str, ...]:
        """The files under data/weights/ an experiment of this method reads beside its backbone's weights."""
        return tuple(self.weights_read(spec)) if self.weights_read else ()

    def keys(self) -> dict:
        """The JSON-schema properties of its own experiment keys (:func:`ifcl.settings.properties`)."""
        return properties(self.settings) if self.settings else {}

    def required(self) -> list[str]:
        """Which of its keys an experiment must give."""
        return required(self.settings) if self.settings else []

    def files(self, spec: dict, t: int) -> tuple[str, ...]:
        return (self.task_files or state_files)(spec, t)

    def figures(self, spec: dict) -> tuple[str, ...]:
        return self.run_figures(spec) if self.run_figures else ()

    def log_column(self, name: str) -> str:
        return self.log_fields.get(name, LOG_COLUMNS[name])


class RegistryError(ValueError):
    """A method declaration that cannot be read; the message names where it comes from."""


def _declared(load, origin: str) -> list[Method]:
    try:
        value = load()
    except Exception as e:  # an entry point's package that fails to import, or a declaration that fails its checks
        raise RegistryError(f"{origin}: {type(e).__name__}: {e}") from e
    found = [value] if isinstance(value, Method) else list(value) if isinstance(value, (list, tuple)) else None
    if found is None or not all(isinstance(m, Method) for m in found):
        raise RegistryError(f"{origin}: expected a Method or a sequence of them, got {type(value).__name__}")
    return found


@lru_cache(maxsize=1)
def methods() -> dict[str, Method]:
    """Every known method by name: ifcl's own (``METHODS`` of each :mod:`ifcl.catalog` module), then those of
    installed packages (entry points of group ``ifcl.methods``). A declaration that cannot be read, and a name
    declared twice, are a :class:`RegistryError` naming where they come from."""
    from . import catalog

    found: dict[str, tuple[Method, str]] = {}
    sources = [(f"{catalog.__name__}.{m.name}", lambda n=m.name: importlib.import_module(f"{catalog.__name__}.{n}").METHODS)
               for m in sorted(pkgutil.iter_modules(catalog.__path__), key=lambda m: m.name)]
    sources += [(f"entry point {ep.name} = {ep.value} of group {ENTRY_POINT_GROUP}"
                 + (f" (package {ep.dist.name})" if getattr(ep, "dist", None) else ""), ep.load)
                for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)]
    for origin, load in sources:
        for method in _declared(load, origin):
            if method.name in found:
                raise RegistryError(f"method {method.name!r} is declared twice: by {found[method.name][1]} and by "
                                    f"{origin}")
            found[method.name] = (method, origin)
    return {name: m for name, (m, _) in found.items()}


def method(name: str) -> Method:
    known = methods()
    if name not in known:
        raise KeyError(f"unknown method {name!r} (known: {', '.join(sorted(known))})")
    return known[name]


def method_of(spec: dict) -> Method:
    """The method of an experiment."""
    return method(spec["method"])


def protocol_of(spec: dict) -> Protocol:
    """The protocol of an experiment (its method's)."""
    return PROTOCOLS[method_of(spec).protocol]


def num_tasks(spec: dict) -> int:
    return protocol_of(spec).num_tasks(spec)


def task_files(spec: dict, t: int) -> tuple[str, ...]:
    """The files of task t of a run of the experiment."""
    return method_of(spec).files(spec, t)


def model_settings(spec: dict) -> dict:
    """What shapes an experiment's model (the rules' ``model`` parameter): its method, backbone and the method's
    ``model_keys`` the experiment has."""
    keys = ("method", "backbone") + method_of(spec).model_keys
    return {k: spec[k] for k in keys if k in spec}


def implementation(spec_or_method) -> object:
    """The module of a method's steps (``model_after_task``, ``evaluate_run`` and the step functions)."""
    m = spec_or_method if isinstance(spec_or_method, Method) else method_of(spec_or_method)
    return importlib.import_module(m.steps)


def load_object(path: str):
    """The object at "module:attribute"."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _module_names(m: Method) -> list[str]:
    return [m.steps] + ([m.model.partition(":")[0]] if m.model else [])


def method_code(m: Method, src: str | Path) -> str:
    """Digest of a method's implementation modules (its steps module, its model's module) and of the modules they
    import, in ifcl and in the method's own package (:func:`ifcl.codeversion.code_version`)."""
    import hashlib
    from importlib.util import find_spec

    from .codeversion import code_version

    h = hashlib.sha256()
    for name in _module_names(m):
        spec = find_spec(name)
        if spec is None or not spec.origin:
            raise ModuleNotFoundError(f"method {m.name!r}: module {name} not found")
        origin = Path(spec.origin)
        root = origin.parents[len(name.split(".")) - (0 if origin.name == "__init__.py" else 1)]
        roots = ((name.split(".")[0], str(root)),) if name.split(".")[0] != "ifcl" else ()
        h.update(name.encode() + b"\0" + code_version(origin, src, roots).encode())
    return h.hexdigest()
