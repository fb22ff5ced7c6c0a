# Rule summarize: metrics.json of every run -> summary.csv, summary.md (mean ± std over seeds).
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.results import summarize

    experiments = snakemake.params.experiments
    runs = {exp: {s: f"results/runs/{exp}/seed{s}/metrics.json" for s in spec["seeds"]} for exp, spec in experiments.items()}
    summarize(runs, experiments, snakemake.output.csv, snakemake.output.md)
