# Rule frozen_features: frozen CLIP image features of one dataset split -> features.safetensors.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.diki import FrozenFeatures, frozen_features

    frozen_features(from_rule(FrozenFeatures, snakemake))
