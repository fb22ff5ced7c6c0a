# Rule class_stats: InfLoRA+CA per-class feature Gaussians of task t -> class_stats.safetensors.
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.runtime import from_rule
    from ifcl.steps.inflora import ClassStats, class_stats

    class_stats(from_rule(ClassStats, snakemake))
