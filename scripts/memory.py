# Rule memory: InfLoRA's (Dual)GPM memory after task t -> memory.safetensors.
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.runtime import from_rule
    from ifcl.steps.inflora import Memory, memory

    memory(from_rule(Memory, snakemake))
