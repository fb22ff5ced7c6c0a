# Figures of the results (ifcl.plots), PNG and PDF; plot settings from params.yaml (FIGURE_SETTINGS). The PNGs and
# the summary tables are marked for `snakemake --report` (captions in workflow/report/).


rule figures:
    """Every figure: the target of dvc.yaml's figures stage."""
    input:
        figure_targets(),


rule accuracy_curves:
    """Accuracy after each task, one panel per protocol, one line per experiment with a band over seeds (settings:
    params.yaml), and the curves as data for `dvc plots show`."""
    input:
        [path for by_seed in run_results().values() for files in by_seed.values() for path in files.values()],
    output:
        png=report(f"{FIGURES}/accuracy_curves.png", caption="../report/accuracy_curves.rst", category="Overview"),
        pdf=f"{FIGURES}/accuracy_curves.pdf",
        data=f"{FIGURES}/accuracy_curves.json",
    params:
        code=code("accuracy_curves"),
        runs=run_results(),
        protocols=protocols(),
        colours=EXPERIMENT_COLOURS,
        settings=FIGURE_SETTINGS,
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/accuracy_curves.log",
    script:
        "../../scripts/accuracy_curves.py"


rule overview:
    """One page: per benchmark, the methods' accuracy curves and final metrics next to the published numbers."""
    input:
        [path for by_seed in run_results().values() for files in by_seed.values() for path in files.values()],
        summary=rules.summarize.output.json,
    output:
        png=report(f"{FIGURES}/overview.png", caption="../report/overview.rst", category="Overview"),
        pdf=f"{FIGURES}/overview.pdf",
    params:
        code=code("overview"),
        runs=run_results(),
        protocols=protocols(),
        colours=EXPERIMENT_COLOURS,
        settings=FIGURE_SETTINGS,
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/overview.log",
    script:
        "../../scripts/overview.py"


rule accuracy_matrix:
    """Heatmap of one run's accuracy matrix, every cell annotated."""
    input:
        layout.run_pattern(layout.ACC_MATRIX),
    output:
        png=report(f"{RUN_FIGURES}/acc_matrix.png", caption="../report/accuracy_matrix.rst",
                   category="Accuracy matrices", subcategory="{exp}", labels={"experiment": "{exp}", "seed": "{seed}"}),
        pdf=f"{RUN_FIGURES}/acc_matrix.pdf",
    params:
        code=code("accuracy_matrix"),
        labels=matrix_labels,
        settings=FIGURE_SETTINGS,
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/accuracy_matrix/{exp}/seed{seed}.log",
    script:
        "../../scripts/accuracy_matrix.py"


rule forgetting:
    """Class-incremental experiments: forgetting of each old task after the last one, mean ± std over seeds."""
    input:
        seed_matrices,
    output:
        png=report(f"{FIGURES}/{{exp}}/forgetting.png", caption="../report/forgetting.rst", category="Forgetting",
                   labels={"experiment": "{exp}"}),
        pdf=f"{FIGURES}/{{exp}}/forgetting.pdf",
    wildcard_constraints:
        exp=FORGETTING_EXPERIMENTS,
    params:
        code=code("forgetting"),
        colour=experiment_colour,
        settings=FIGURE_SETTINGS,
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/forgetting/{exp}.log",
    script:
        "../../scripts/forgetting.py"


rule memory_sizes:
    """InfLoRA (the methods whose runs have the figure "memory"): the dimension of the old tasks' space kept in each
    adapted block's memory, after each task."""
    input:
        memory_files,
    output:
        png=report(f"{RUN_FIGURES}/memory.png", caption="../report/memory_sizes.rst", category="InfLoRA memory",
                   subcategory="{exp}", labels={"experiment": "{exp}", "seed": "{seed}"}),
        pdf=f"{RUN_FIGURES}/memory.pdf",
    wildcard_constraints:
        exp=MEMORY_EXPERIMENTS,
    params:
        code=code("memory_sizes"),
        colour=experiment_colour,
        settings=FIGURE_SETTINGS,
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/memory_sizes/{exp}/seed{seed}.log",
    script:
        "../../scripts/memory_sizes.py"


rule lambda_histograms:
    """DIKI (the methods whose runs have the figure "lambda"): the distribution of λ over the test images of the
    learnt and the unseen datasets, after each task."""
    input:
        evals,
    output:
        png=report(f"{RUN_FIGURES}/lambda.png", caption="../report/lambda_histograms.rst", category="DIKI λ",
                   subcategory="{exp}", labels={"experiment": "{exp}", "seed": "{seed}"}),
        pdf=f"{RUN_FIGURES}/lambda.pdf",
    wildcard_constraints:
        exp=LAMBDA_EXPERIMENTS,
    params:
        code=code("lambda_histograms"),
        sequence=lambda wildcards: EXPERIMENTS[wildcards.exp]["sequence"],
        settings=FIGURE_SETTINGS,
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/lambda_histograms/{exp}/seed{seed}.log",
    script:
        "../../scripts/lambda_histograms.py"


rule training_curves:
    """One run's loss and training accuracy per epoch over its whole task sequence, task boundaries marked."""
    input:
        train_logs,
    output:
        png=report(f"{RUN_FIGURES}/training.png", caption="../report/training_curves.rst", category="Training",
                   subcategory="{exp}", labels={"experiment": "{exp}", "seed": "{seed}"}),
        pdf=f"{RUN_FIGURES}/training.pdf",
    params:
        code=code("training_curves"),
        columns=log_columns,
        labels=task_labels,
        colour=experiment_colour,
        settings=FIGURE_SETTINGS,
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/training_curves/{exp}/seed{seed}.log",
    script:
        "../../scripts/training_curves.py"


rule training_curves_data:
    """Every run's training, one record per epoch, as data for `dvc plots show`."""
    input:
        [path for by_seed in all_train_logs().values() for paths in by_seed.values() for path in paths],
    output:
        f"{FIGURES}/training_curves.json",
    params:
        code=code("training_curves_data"),
        logs=all_train_logs(),
        columns={exp: log_columns(exp) for exp in EXPERIMENTS},
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/training_curves_data.log",
    script:
        "../../scripts/training_curves_data.py"
