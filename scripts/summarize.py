# Rule summarize: metrics.json of every run -> summary.{csv,md,html,json} (mean ± std over seeds next to the published
# numbers of config/published.yaml, marked where the experiment's settings differ from the paper config's).
from ifcl.runlog import job

with job(snakemake):
    from ifcl.results import summarize

    p, out = snakemake.params, snakemake.output
    summarize(p.runs, p.experiments, p.published, out.csv, out.md, out.json, out.html, p.protocol_changes)
