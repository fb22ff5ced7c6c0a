"""The linear probe as an ifcl method: the declaration ifcl reads at every workflow start (no torch here).

The frozen ViT's CLS feature, optionally L2-normalised, and one linear head per task trained on that task's
classes; the model after task t concatenates heads 0..t. It is the class-incremental lower bound of methods that
adapt the backbone: whatever they gain over it, adaptation bought.
"""
from dataclasses import dataclass

from ifcl.registry import Method
from ifcl.settings import setting


@dataclass(frozen=True, kw_only=True)
class Probe:
    """the probe's features"""

    normalize: bool = setting(False, "L2-normalise the CLS feature before the head")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The method's own experiment keys (each becomes `experiments.<name>.<key>`, validated and documented)."""

    probe: Probe = setting(Probe())


METHOD = Method(
    name="linear-probe",
    protocol="cil",  # class-incremental: one dataset split into tasks
    title="linear probe",
    description="one linear head per task on the frozen ViT's CLS features (settings under probe)",
    model="ifcl_linear_probe.model:build",  # the state chain: a model with the task-state interface
    settings=Settings,  # typed settings: the schema of its keys, their defaults and docs
    model_keys=("probe",),  # what shapes the model: a change re-runs every task
)
