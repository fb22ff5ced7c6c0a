# Rule train_task: E_t and head t -> adapter.safetensors, train_log.csv.
from pathlib import Path

from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.chain import train_task

    w, p = snakemake.wildcards, snakemake.params
    train_task(w.exp, snakemake.config["experiments"][w.exp], int(w.seed), int(w.t), p.train, p.dataset, p.backbone,
               snakemake.input.backbone, str(Path(snakemake.input.tasks).parent), snakemake.input.train,
               snakemake.output.adapter, snakemake.output.log_csv, snakemake.threads, snakemake.input.decoded or None)
