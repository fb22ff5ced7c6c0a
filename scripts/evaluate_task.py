# Rule evaluate_task: accuracy on every seen task after task t -> eval.json.
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.runtime import from_rule
    from ifcl.steps.inflora import Evaluate, evaluate

    evaluate(from_rule(Evaluate, snakemake))
