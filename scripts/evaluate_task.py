# Rule evaluate_task: accuracy on every seen task after task t -> eval.json.
from pathlib import Path

from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.chain import evaluate_task

    w, p = snakemake.wildcards, snakemake.params
    evaluate_task(snakemake.config["experiments"][w.exp], int(w.t), p.dataset, p.backbone, snakemake.input.backbone,
                  str(Path(snakemake.input.tasks).parent), snakemake.input.test, snakemake.output[0], snakemake.threads,
                  snakemake.input.decoded or None)
