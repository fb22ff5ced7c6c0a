# Rule accuracy_matrix: one run's acc_matrix.csv -> a heatmap with every cell annotated (PNG and PDF).
from ifcl.runlog import job

with job(snakemake):
    from ifcl.plots import plot_accuracy_matrix, read_matrix

    w, p = snakemake.wildcards, snakemake.params
    acc = read_matrix(snakemake.input[0])
    labels = p.labels or [f"task {t}" for t in range(len(acc))]
    plot_accuracy_matrix(acc, labels, f"{w.exp}, seed {w.seed}", p.settings, list(snakemake.output))
