# MoE-Adapters' rule chain ("moe", ifcl.catalog.moe_adapters; steps in ifcl.steps.moe_adapters): beside the MTIL
# protocol's frozen features (mtil.smk, for the zero-shot accuracy), per task t: train_moe_t (from the experts and
# routers task t-1 left) and train_autoencoder_t (DDAS's autoencoder of dataset t), once per run
# train_reference_autoencoder (task 0's reference autoencoder) -> evaluate_moe_t (every dataset of the sequence,
# DDAS picking a router or the frozen CLIP per test batch).

MOE_EXPERIMENTS = chain_experiments("mtil", "moe")


rule train_moe:
    """MoE-Adapters task t: train its router and the experts not frozen on dataset t."""
    input:
        unpack(moe_train_inputs),
    output:
        out=layout.task_pattern(layout.STATE),
        log_csv=layout.task_pattern(layout.TRAIN_LOG),
    params:
        code=method_code("train_moe"),
        model=model_params,
        train=exp_setting("train"),
        backbone=exp_backbone,
        dataset=lambda wildcards: prompt_spec(sequence_dataset(wildcards)),
        loader_workers=exp_setting("loader_workers"),
    wildcard_constraints:
        exp=MOE_EXPERIMENTS,
    threads: 1
    resources:
        gpu=1,
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/train_moe/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/train_moe.py"


rule train_autoencoder:
    """MoE-Adapters task t: DDAS's autoencoder of dataset t's training images (slot t + 1)."""
    input:
        unpack(moe_autoencoder_inputs(sequence_dataset)),
    output:
        out=layout.task_pattern(layout.AUTOENCODER),
    params:
        code=method_code("train_autoencoder"),
        slot=lambda wildcards: int(wildcards.t) + 1,
        ddas=moe_autoencoder_settings,
        images=moe_training_images,
        backbone=exp_backbone,
        loader_workers=exp_setting("loader_workers"),
    wildcard_constraints:
        exp=MOE_EXPERIMENTS,
    threads: 1
    resources:
        gpu=1,
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/train_autoencoder/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/train_autoencoder.py"


rule train_reference_autoencoder:
    """MoE-Adapters: DDAS's reference autoencoder (slot 0, the frozen CLIP's) on ddas.reference's training images,
    once per run (a file of task 0)."""
    input:
        unpack(moe_autoencoder_inputs(lambda wildcards: EXPERIMENTS[wildcards.exp]["ddas"]["reference"])),
    output:
        out=f"{layout.RUN}/task0/{layout.REFERENCE_AUTOENCODER}",
    params:
        code=method_code("train_autoencoder"),
        slot=0,
        ddas=moe_autoencoder_settings,
        images=moe_training_images,
        backbone=exp_backbone,
        loader_workers=exp_setting("loader_workers"),
    wildcard_constraints:
        exp=MOE_EXPERIMENTS,
    threads: 1
    resources:
        gpu=1,
    group:
        job_group(per_task=False)
    conda:
        CONDA_ENV
    log:
        "logs/train_reference_autoencoder/{exp}/seed{seed}.log",
    script:
        "../../scripts/train_autoencoder.py"


rule evaluate_moe:
    """MoE-Adapters after task t: every dataset of the sequence, each test batch through the router DDAS picks or
    the frozen CLIP (a row of the accuracy matrix)."""
    input:
        unpack(moe_eval_inputs),
    output:
        out=layout.task_pattern(layout.EVAL),
    params:
        code=method_code("evaluate_moe"),
        model=model_params,
        ddas=exp_setting("ddas"),
        eval_batch_size=exp_setting("eval_batch_size"),
        backbone=exp_backbone,
        datasets=lambda wildcards: [prompt_spec(ds) for ds in EXPERIMENTS[wildcards.exp]["sequence"]],
        loader_workers=exp_setting("loader_workers"),
    wildcard_constraints:
        exp=MOE_EXPERIMENTS,
    threads: 1
    resources:
        gpu=1,
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/evaluate_moe/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/evaluate_moe.py"
