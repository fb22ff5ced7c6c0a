# Datasets -> manifests (data/prepared/<dataset>/{train,test}.csv), and backbones pretrained in the pipeline.


rule generate_dataset:
    """Draw a generated dataset as PNG files in class folders and list them in manifests."""
    output:
        images=directory("data/generated/{dataset}"),
        train="data/prepared/{dataset}/train.csv",
        test="data/prepared/{dataset}/test.csv",
    params:
        spec=dataset_content,
    wildcard_constraints:
        dataset=names_of_type(DATASETS, "generated"),
    conda:
        CONDA_ENV
    log:
        "logs/generate_dataset/{dataset}.log",
    script:
        "../../scripts/prepare_dataset.py"


rule folder_manifest:
    """List a user's class-folder tree in manifests (the images are never moved or copied)."""
    output:
        train="data/prepared/{dataset}/train.csv",
        test="data/prepared/{dataset}/test.csv",
    params:
        spec=dataset_content,
    wildcard_constraints:
        dataset=names_of_type(DATASETS, "folder"),
    conda:
        CONDA_ENV
    log:
        "logs/folder_manifest/{dataset}.log",
    script:
        "../../scripts/prepare_dataset.py"


rule pretrain_backbone:
    """Pretrain a small ViT on generated classes disjoint from the continual ones (demo backbones)."""
    input:
        train=pretrain_manifest("train"),
        test=pretrain_manifest("test"),
    output:
        weights="results/backbones/{backbone}/backbone.safetensors",
        log_csv="results/backbones/{backbone}/pretrain_log.csv",
    params:
        spec=lambda wildcards: BACKBONES[wildcards.backbone],
        dataset=lambda wildcards: DATASETS[BACKBONES[wildcards.backbone]["pretrain"]["dataset"]],
    wildcard_constraints:
        backbone=names_of_type(BACKBONES, "pretrain"),
    threads: 2
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    log:
        "logs/pretrain_backbone/{backbone}.log",
    script:
        "../../scripts/pretrain_backbone.py"
