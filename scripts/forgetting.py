# Rule forgetting: acc_matrix.csv of every seed of a class-incremental experiment -> forgetting of each old task
# (bars: mean over seeds in the experiment's colour, error bars: std), PNG and PDF.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.metrics import forgetting_per_task
    from ifcl.plots import plot_forgetting, read_matrix

    p = snakemake.params
    per_seed = [forgetting_per_task(read_matrix(path)) for path in snakemake.input]
    plot_forgetting(per_seed, snakemake.wildcards.exp, p.colour, p.settings, list(snakemake.output))
