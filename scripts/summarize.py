# Rule summarize: metrics.json of every run -> summary.csv, summary.md, summary.json (mean ± std over seeds).
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.results import summarize

    p = snakemake.params
    summarize(p.runs, p.experiments, snakemake.output.csv, snakemake.output.md, snakemake.output.json)
