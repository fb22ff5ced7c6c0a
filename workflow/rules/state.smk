# The class-incremental protocol's generic rule chain ("state"; ifcl.steps.state), for every method whose
# declaration names a model with the task-state interface (L2P, DualPrompt, CODA-Prompt, SD-LoRA, a researcher's own
# method): after the split (cil.smk), for each task t: train_state_t (the state files of tasks 0..t-1 in) ->
# evaluate_state_t (the state files of tasks 0..t in). Each job's `code` is its script's digest and its method's.

STATE_EXPERIMENTS = chain_experiments("cil", "state")


rule train_state:
    """Train what task t adds (prompts, or SD-LoRA's factors and magnitudes) and head t on task t's classes."""
    wildcard_constraints:
        exp=STATE_EXPERIMENTS,
    input:
        tasks=layout.run_pattern(layout.TASKS),
        weights=exp_backbone_weights,
        manifest=exp_manifest("train"),
        previous=tasks_before(layout.STATE),
        decoded=task_images_decoded,
        statistics_decoded=statistics_images_decoded,
    output:
        out=layout.task_pattern(layout.STATE),
        log_csv=layout.task_pattern(layout.TRAIN_LOG),
    params:
        code=method_code("train_state"),
        model=model_params,
        train=train_params,
        transform=task_images,
        drop_last=train_drop_last,
        statistics=statistics_images,
        backbone=exp_backbone,
        dataset=exp_dataset,
        precision=exp_setting("gpu_precision"),
        loader_workers=exp_setting("loader_workers"),
    threads: 1
    resources:
        gpu=1,
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/train_state/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/train_state.py"


rule evaluate_state:
    """Accuracy on every seen task after task t (one row of the accuracy matrix)."""
    wildcard_constraints:
        exp=STATE_EXPERIMENTS,
    input:
        tasks=layout.run_pattern(layout.TASKS),
        weights=exp_backbone_weights,
        manifest=exp_manifest("test"),
        states=tasks_through(layout.STATE),
        decoded=exp_decoded("test", "test_transform"),
    output:
        out=layout.task_pattern(layout.EVAL),
    params:
        code=method_code("evaluate_state"),
        model=model_params,
        eval_batch_size=exp_setting("eval_batch_size"),
        backbone=exp_backbone,
        dataset=exp_dataset,
        precision=exp_setting("gpu_precision"),
        loader_workers=exp_setting("loader_workers"),
    threads: 1
    resources:
        gpu=1,
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/evaluate_state/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/evaluate_state.py"
