# Rule aggregate_run: eval.json of every task -> acc_matrix.csv, metrics.json.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.results import aggregate_run

    inp = snakemake.input
    aggregate_run(list(inp.evals), snakemake.output.matrix, snakemake.output.metrics, snakemake.params.protocol,
                  list(getattr(inp, "zero_shot", [])))
