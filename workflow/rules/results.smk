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
        [f"{run}/metrics.json" for exp in EXPERIMENTS for run in run_dirs(exp)],
    output:
        csv="results/summary/summary.csv",
        md="results/summary/summary.md",
    params:
        experiments=EXPERIMENTS,
    conda:
        CONDA_ENV
    log:
        "logs/summarize.log",
    script:
        "../../scripts/summarize.py"
