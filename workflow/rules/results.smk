# Aggregation: accuracy matrix and metrics per run, mean ± std over seeds per experiment.


rule aggregate_run:
    """acc_matrix.csv (row i = after task i) and metrics.json (A_T, Ā, forgetting, BWT) of one run."""
    input:
        run_evals,
    output:
        matrix="results/runs/{exp}/seed{seed}/acc_matrix.csv",
        metrics="results/runs/{exp}/seed{seed}/metrics.json",
    conda:
        CONDA_ENV
    log:
        "logs/aggregate_run/{exp}/seed{seed}.log",
    script:
        "../../scripts/aggregate_run.py"


rule summarize:
    """Mean ± std over seeds of every metric, one row per configured experiment."""
    input:
        [path for by_seed in run_metrics().values() for path in by_seed.values()],
    output:
        csv="results/summary/summary.csv",
        md="results/summary/summary.md",
    params:
        runs=run_metrics(),
        experiments=EXPERIMENTS,
    conda:
        CONDA_ENV
    log:
        "logs/summarize.log",
    script:
        "../../scripts/summarize.py"
