# Rule train_moe: task t of MoE-Adapters -> state.safetensors (experts, routers 0..t, frozen experts), train_log.csv.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.moe_adapters import Train, train

    train(from_rule(Train, snakemake))
