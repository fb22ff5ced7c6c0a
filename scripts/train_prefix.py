# Rule train_prefix: DIKI task t's prefixes -> prefix.safetensors, train_log.csv.
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.diki_chain import train_prefix

    w, p, inp = snakemake.wildcards, snakemake.params, snakemake.input
    train_prefix(w.exp, snakemake.config["experiments"][w.exp], int(w.seed), int(w.t), p.dataset, p.backbone,
                 inp.backbone, inp.train, getattr(inp, "val", None), snakemake.output.prefix, snakemake.output.log_csv,
                 getattr(inp, "previous", None), snakemake.threads, getattr(inp, "decoded_train", None),
                 getattr(inp, "decoded_val", None))
