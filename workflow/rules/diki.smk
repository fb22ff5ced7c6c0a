# DIKI (ifcl.steps.diki): a frozen CLIP learns a sequence of datasets, one task each.
# Frozen features once per (backbone, dataset, split) -> per task t: gaussian_t and train_prefix_t (independent of
# the other tasks unless rng: sequential) -> evaluate_t (every dataset of the sequence, seen and unseen).


rule pretrain_clip:
    """Contrastively pretrain a small CLIP on captioned generated classes disjoint from the sequence (demo)."""
    input:
        train=pretrain_manifest("train"),
        test=pretrain_manifest("test"),
    output:
        weights=f"{layout.PRETRAINED}/{layout.BACKBONE}",
        log_csv=f"{layout.PRETRAINED}/{layout.PRETRAIN_LOG}",
    params:
        code=code("pretrain_clip"),
        spec=lambda wildcards: BACKBONES[wildcards.backbone],
        dataset=lambda wildcards: DATASETS[BACKBONES[wildcards.backbone]["pretrain"]["dataset"]],
    wildcard_constraints:
        backbone=names_of_type(BACKBONES, "pretrain_clip"),
    threads: 2
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    log:
        "logs/pretrain_clip/{backbone}.log",
    script:
        "../../scripts/pretrain_clip.py"


rule frozen_features:
    """The frozen CLIP's L2-normalised image features of one dataset split (and its zero-shot accuracy)."""
    input:
        weights=lambda wildcards: backbone_weights(wildcards.backbone),
        manifest=lambda wildcards: manifest(wildcards.dataset, wildcards.split),
    output:
        out=layout.FEATURES,
    params:
        code=code("frozen_features"),
        backbone=lambda wildcards: BACKBONES[wildcards.backbone],
        dataset=lambda wildcards: prompt_spec(wildcards.dataset),
    wildcard_constraints:
        split="train|test",
    threads: 1
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    log:
        "logs/frozen_features/{backbone}/{dataset}/{split}.log",
    script:
        "../../scripts/frozen_features.py"


rule gaussian:
    """DIKI task t: mean and covariance of the frozen training features of dataset t."""
    input:
        features=lambda wildcards: features(EXPERIMENTS[wildcards.exp]["backbone"], diki_dataset(wildcards), "train"),
    output:
        out=layout.task_pattern(layout.GAUSSIAN),
    wildcard_constraints:
        exp=DIKI_EXPERIMENTS,
    params:
        code=code("gaussian"),
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
        model=diki_model_params,
        train=exp_setting("train"),
        rng=exp_setting("rng"),
        eval_batch_size=exp_setting("eval_batch_size"),
        backbone=exp_backbone,
        dataset=lambda wildcards: prompt_spec(diki_dataset(wildcards)),
        precision=exp_setting("gpu_precision"),
        loader_workers=exp_setting("loader_workers"),
    wildcard_constraints:
        exp=DIKI_EXPERIMENTS,
    threads: 1
    resources:
        gpu=1,
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
        model=diki_model_params,
        calibration=exp_setting("calibration"),
        eval_batch_size=exp_setting("eval_batch_size"),
        backbone=exp_backbone,
        datasets=lambda wildcards: [prompt_spec(ds) for ds in EXPERIMENTS[wildcards.exp]["sequence"]],
        precision=exp_setting("gpu_precision"),
        loader_workers=exp_setting("loader_workers"),
    wildcard_constraints:
        exp=DIKI_EXPERIMENTS,
    threads: 1
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    log:
        "logs/evaluate_diki/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/evaluate_diki.py"
