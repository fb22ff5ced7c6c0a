# Rule evaluate_diki: every dataset of the sequence after DIKI task t -> eval.json.
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.diki_chain import evaluate

    w, p, inp = snakemake.wildcards, snakemake.params, snakemake.input
    evaluate(snakemake.config["experiments"][w.exp], int(w.t), p.datasets, p.backbone, inp.backbone,
             list(inp.gaussians), list(inp.prefixes), list(inp.tests), list(inp.features), snakemake.output[0],
             snakemake.threads, list(inp.decoded) or None)
