"""The linear probe as an ifcl method: the declaration ifcl reads at every workflow start (no torch here).

The frozen ViT's CLS feature, optionally L2-normalised, and one linear head per task trained on that task's
classes; the model after task t concatenates heads 0..t. It is the class-incremental lower bound of methods that
adapt the backbone: whatever they gain over it, adaptation bought.
"""
from ifcl.registry import Method

METHOD = Method(
    name="linear-probe",
    protocol="cil",  # class-incremental: one dataset split into tasks
    title="linear probe",
    description="one linear head per task on the frozen ViT's CLS features (settings under probe)",
    model="ifcl_linear_probe.model:build",  # the state chain: a model with the task-state interface
    settings={  # JSON-schema properties of the method's own experiment keys
        "probe": {
            "description": "the probe's features",
            "type": "object",
            "properties": {
                "normalize": {"type": "boolean", "default": False,
                              "description": "L2-normalise the CLS feature before the head"},
            },
            "additionalProperties": False,
            "default": {},
        },
    },
    model_keys=("probe",),  # what shapes the model: a change re-runs every task
)
