# Rule evaluate_state: accuracy after task t of an L2P, DualPrompt, CODA-Prompt or SD-LoRA run -> eval.json.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.state import Evaluate, evaluate

    evaluate(from_rule(Evaluate, snakemake))
