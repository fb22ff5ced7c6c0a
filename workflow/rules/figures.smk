# Figures of the results (ifcl.plots), PNG and PDF; plot settings from params.yaml (FIGURE_SETTINGS).


rule figures:
    """Accuracy after each task, one line per experiment with a band over seeds (settings: params.yaml)."""
    input:
        [path for by_seed in run_results().values() for files in by_seed.values() for path in files.values()],
    output:
        png="results/figures/accuracy_curves.png",
        pdf="results/figures/accuracy_curves.pdf",
    params:
        code=code("figures"),
        runs=run_results(),
        protocols=protocols(),
        settings=FIGURE_SETTINGS,
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/figures.log",
    script:
        "../../scripts/figures.py"
