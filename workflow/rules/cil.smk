# The class-incremental protocol's own rules (ifcl.protocols.CIL); its methods' chains follow in tasks.smk (InfLoRA)
# and state.smk (the state chain, any method with the task-state interface).


rule split_tasks:
    """Class order and the classes of each task (tasks.json) of every class-incremental run."""
    input:
        train=exp_manifest("train"),
    output:
        layout.run_pattern(layout.TASKS),
    params:
        code=code("split_tasks"),
        num_tasks=exp_setting("num_tasks"),
        class_order=exp_setting("class_order"),
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/split_tasks/{exp}/seed{seed}.log",
    script:
        "../../scripts/split_tasks.py"
