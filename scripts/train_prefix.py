# Rule train_prefix: DIKI task t's prefixes -> prefix.safetensors, train_log.csv.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.diki import Train, train

    train(from_rule(Train, snakemake))
