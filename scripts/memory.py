# Rule memory: InfLoRA's (Dual)GPM memory after task t -> memory.safetensors.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.inflora import Memory, memory

    memory(from_rule(Memory, snakemake))
