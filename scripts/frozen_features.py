# Rule frozen_features: frozen CLIP image features of one dataset split -> features.safetensors.
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.runtime import from_rule
    from ifcl.steps.diki import FrozenFeatures, frozen_features

    frozen_features(from_rule(FrozenFeatures, snakemake))
