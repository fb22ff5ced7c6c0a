# Rule train_finetune: task t of the MTIL full fine-tuning family -> state.safetensors (the CLIP's weights), train_log.csv.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.zscl import Train, train

    train(from_rule(Train, snakemake))
