# Rule evaluate_diki: every dataset of the sequence after DIKI task t -> eval.json.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.diki import Evaluate, evaluate

    evaluate(from_rule(Evaluate, snakemake))
