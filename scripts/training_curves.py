# Rule training_curves: every task's train_log.csv of one run -> its loss and training accuracy per epoch over the
# whole task sequence, task boundaries marked (PNG and PDF).
from ifcl.runlog import job

with job(snakemake):
    from ifcl.files import read_csv
    from ifcl.plots import plot_training, training_log

    w, p = snakemake.wildcards, snakemake.params
    log = training_log([read_csv(path) for path in snakemake.input], p.columns)
    plot_training(log, p.labels, f"{w.exp}, seed {w.seed}: training", p.colour, p.settings, list(snakemake.output))
