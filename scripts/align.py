# Rule align: InfLoRA+CA classifier alignment after task t -> aligned_heads.safetensors, align_log.csv.
from pathlib import Path

from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.chain import align

    w = snakemake.wildcards
    align(w.exp, snakemake.config["experiments"][w.exp], int(w.seed), int(w.t), str(Path(snakemake.input.tasks).parent),
          snakemake.output.heads, snakemake.output.log_csv, snakemake.threads)
