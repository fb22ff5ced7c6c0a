# Rule class_stats: InfLoRA+CA per-class feature Gaussians of task t -> class_stats.safetensors.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.inflora import ClassStats, class_stats

    class_stats(from_rule(ClassStats, snakemake))
