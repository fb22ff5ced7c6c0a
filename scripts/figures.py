# Rule figures: acc_matrix.csv and metrics.json of every run -> accuracy_curves.{png,pdf}.
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.plots import accuracy_curve, plot_accuracy_curves

    p = snakemake.params
    curves = {exp: [accuracy_curve(files["matrix"], files["metrics"], p.protocols[exp]) for files in by_seed.values()]
              for exp, by_seed in p.runs.items()}
    plot_accuracy_curves(curves, p.settings, list(snakemake.output))
