# Rule lambda_histograms: a DIKI run's eval.json after each task -> the distribution of λ over the learnt and the
# unseen datasets, one panel per task (PNG and PDF).
from ifcl.runlog import job

with job(snakemake):
    from ifcl.files import read_json
    from ifcl.plots import lambda_histograms, plot_lambda_histograms

    w, p = snakemake.wildcards, snakemake.params
    edges, rows = lambda_histograms([read_json(path) for path in snakemake.input])
    plot_lambda_histograms(edges, rows, p.sequence, f"{w.exp}, seed {w.seed}: DIKI's λ per test image", p.settings,
                           list(snakemake.output))
