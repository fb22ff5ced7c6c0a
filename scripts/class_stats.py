# Rule class_stats: InfLoRA+CA per-class feature Gaussians of task t -> class_stats.safetensors.
from pathlib import Path

from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.chain import class_stats

    w, p = snakemake.wildcards, snakemake.params
    class_stats(snakemake.config["experiments"][w.exp], int(w.t), p.dataset, p.backbone, snakemake.input.backbone,
                str(Path(snakemake.input.tasks).parent), snakemake.input.train, snakemake.output[0], snakemake.threads,
                snakemake.input.decoded or None)
