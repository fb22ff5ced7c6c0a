# DIKI's rule chain ("prefix", ifcl.catalog.diki; steps in ifcl.steps.diki): beside the MTIL protocol's frozen
# features (mtil.smk), per task t: gaussian_t and train_prefix_t (independent of the other tasks unless
# rng: sequential) -> evaluate_t (every dataset of the sequence, seen and unseen).

PREFIX_EXPERIMENTS = chain_experiments("mtil", "prefix")


rule gaussian:
    """DIKI task t: mean and covariance of the frozen training features of dataset t."""
    input:
        features=lambda wildcards: features(EXPERIMENTS[wildcards.exp]["backbone"], sequence_dataset(wildcards), "train"),
    output:
        out=layout.task_pattern(layout.GAUSSIAN),
    wildcard_constraints:
        exp=PREFIX_EXPERIMENTS,
    params:
        code=code("gaussian"),
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/gaussian/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/gaussian.py"


rule train_prefix:
    """DIKI task t: train the key/value prefixes on dataset t (best validation epoch kept)."""
    input:
        unpack(diki_train_inputs),
    output:
        prefix=layout.task_pattern(layout.PREFIX),
        log_csv=layout.task_pattern(layout.TRAIN_LOG),
    params:
        code=code("train_prefix"),
        model=model_params,
        train=exp_setting("train"),
        rng=exp_setting("rng"),
        eval_batch_size=exp_setting("eval_batch_size"),
        backbone=exp_backbone,
        dataset=lambda wildcards: prompt_spec(sequence_dataset(wildcards)),
        precision=exp_setting("gpu_precision"),
        loader_workers=exp_setting("loader_workers"),
    wildcard_constraints:
        exp=PREFIX_EXPERIMENTS,
    threads: 1
    resources:
        gpu=1,
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/train_prefix/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/train_prefix.py"


rule evaluate_diki:
    """DIKI after task t: every dataset of the sequence through the calibrated model (a row of the matrix)."""
    input:
        unpack(diki_eval_inputs),
    output:
        out=layout.task_pattern(layout.EVAL),
    params:
        code=code("evaluate_diki"),
        model=model_params,
        calibration=exp_setting("calibration"),
        eval_batch_size=exp_setting("eval_batch_size"),
        backbone=exp_backbone,
        datasets=lambda wildcards: [prompt_spec(ds) for ds in EXPERIMENTS[wildcards.exp]["sequence"]],
        precision=exp_setting("gpu_precision"),
        loader_workers=exp_setting("loader_workers"),
    wildcard_constraints:
        exp=PREFIX_EXPERIMENTS,
    threads: 1
    resources:
        gpu=1,
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/evaluate_diki/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/evaluate_diki.py"
