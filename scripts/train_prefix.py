# Rule train_prefix: DIKI task t's prefixes -> prefix.safetensors, train_log.csv.
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.runtime import from_rule
    from ifcl.steps.diki import Train, train

    train(from_rule(Train, snakemake))
