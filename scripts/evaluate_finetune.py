# Rule evaluate_finetune: every dataset of the sequence after task t of the MTIL full fine-tuning family -> eval.json.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.zscl import Evaluate, evaluate

    evaluate(from_rule(Evaluate, snakemake))
