# Rule evaluate_moe: every dataset of the sequence after MoE-Adapters task t, DDAS choosing the router -> eval.json.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.moe_adapters import Evaluate, evaluate

    evaluate(from_rule(Evaluate, snakemake))
