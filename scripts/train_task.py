# Rule train_task: E_t and head t -> adapter.safetensors, train_log.csv.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.inflora import Train, train

    train(from_rule(Train, snakemake))
