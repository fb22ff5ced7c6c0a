# Rule memory: InfLoRA's (Dual)GPM memory after task t -> memory.safetensors.
from pathlib import Path

from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.chain import memory

    w, p = snakemake.wildcards, snakemake.params
    memory(w.exp, snakemake.config["experiments"][w.exp], int(w.seed), int(w.t), p.collect["dataset"], p.backbone,
           snakemake.input.backbone, str(Path(snakemake.input.tasks).parent), snakemake.input.train,
           snakemake.output[0], snakemake.threads, snakemake.input.decoded or None)
