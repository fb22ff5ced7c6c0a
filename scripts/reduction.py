# Rule reduction: down-projections R_t of task t -> reduction.safetensors.
from pathlib import Path

from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.chain import reduction

    w, p = snakemake.wildcards, snakemake.params
    reduction(w.exp, snakemake.config["experiments"][w.exp], int(w.seed), int(w.t), p.collect["dataset"], p.backbone,
              snakemake.input.backbone, str(Path(snakemake.input.tasks).parent), getattr(snakemake.input, "train", None),
              snakemake.output[0], snakemake.threads, getattr(snakemake.input, "decoded", None) or None)
