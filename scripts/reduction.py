# Rule reduction: down-projections R_t of task t -> reduction.safetensors (seq-lora: random; InfLoRA: designed).
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.inflora import Collection, RandomReduction, design, random_design

    if snakemake.params.collect is None:  # seq-lora
        random_design(from_rule(RandomReduction, snakemake))
    else:
        design(from_rule(Collection, snakemake))
