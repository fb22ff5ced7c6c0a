# Rule align: InfLoRA+CA classifier alignment after task t -> aligned_heads.safetensors, align_log.csv.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.inflora import Align, align

    align(from_rule(Align, snakemake))
