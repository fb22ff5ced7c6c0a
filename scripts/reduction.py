# Rule reduction: down-projections R_t of task t -> reduction.safetensors.
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.chain import reduction

    w = snakemake.wildcards
    reduction(w.exp, snakemake.config["experiments"][w.exp], int(w.seed), int(w.t), snakemake.params.backbone,
              snakemake.input.backbone, snakemake.output[0])
