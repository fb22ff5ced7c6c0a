# Rule train_state: what task t adds (prompts, SD-LoRA factors) and head t -> state.safetensors, train_log.csv.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.state import Train, train

    train(from_rule(Train, snakemake))
