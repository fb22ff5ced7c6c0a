# Rule overview: summary.json and every run's accuracy curve -> one page comparing the methods on each benchmark
# (curves and final metrics with the published numbers, each experiment in its colour), PNG and PDF.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.files import read_json
    from ifcl.plots import plot_overview, run_curves
    from ifcl.results import overview_benchmarks

    p = snakemake.params
    curves = {exp: list(by_seed.values()) for exp, by_seed in run_curves(p.runs, p.protocols).items()}
    plot_overview(overview_benchmarks(read_json(snakemake.input.summary), curves), p.protocols, p.colours, p.settings,
                  list(snakemake.output))
