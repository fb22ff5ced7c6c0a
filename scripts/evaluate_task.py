# Rule evaluate_task: accuracy on every seen task after task t -> eval.json.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.inflora import Evaluate, evaluate

    evaluate(from_rule(Evaluate, snakemake))
