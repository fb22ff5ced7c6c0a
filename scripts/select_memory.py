# Rule select_memory: iCaRL's exemplar memory after task t -> memory.safetensors.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.zscl import SelectMemory, select_memory

    select_memory(from_rule(SelectMemory, snakemake))
