# Aggregation: accuracy matrix and metrics per run, mean ± std over seeds per experiment.


rule aggregate_run:
    """acc_matrix.csv (row i = after task i) and metrics.json of one run (CIL: A_T, Ā, forgetting, BWT; MTIL:
    Transfer, Average, Last and the frozen model's zero-shot accuracy)."""
    input:
        unpack(run_evals),
    output:
        matrix=layout.run_pattern(layout.ACC_MATRIX),
        metrics=layout.run_pattern(layout.METRICS),
    params:
        code=code("aggregate_run"),
        protocol=lambda wildcards: protocols()[wildcards.exp],
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/aggregate_run/{exp}/seed{seed}.log",
    script:
        "../../scripts/aggregate_run.py"


rule summarize:
    """Mean ± std over seeds of every metric of every configured experiment, next to the published numbers
    (config/published.yaml) with the difference."""
    input:
        [files["metrics"] for by_seed in run_results().values() for files in by_seed.values()],
    output:
        csv=report(f"{layout.SUMMARY}/summary.csv", caption="../report/summary.rst", category="Summary"),
        md=report(f"{layout.SUMMARY}/summary.md", caption="../report/summary.rst", category="Summary"),
        html=report(f"{layout.SUMMARY}/summary.html", caption="../report/summary.rst", category="Summary"),
        json=f"{layout.SUMMARY}/summary.json",
    params:
        code=code("summarize"),
        runs=run_results(),
        experiments=EXPERIMENTS,
        published=PUBLISHED,
        protocol_changes=protocol_changes_of_runs,
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/summarize.log",
    script:
        "../../scripts/summarize.py"
