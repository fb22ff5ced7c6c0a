# Datasets -> manifests (data/prepared/<dataset>/{train,test}.csv); pretrained weights: fetched or pretrained here.
# The fetch rules are local rules (on a cluster they run where the network is: the login node).


rule fetch_source:
    """Download, verify and extract one raw source of the paper benchmarks (or accept a copy placed by hand)."""
    output:
        f"{RAW}/{{source}}/{SOURCE_MARKER}",
    params:
        code=code("fetch_source"),
        mirror=DOWNLOAD_MIRROR,
    wildcard_constraints:
        source="|".join(re.escape(s) for s in SOURCES),
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/fetch_source/{source}.log",
    script:
        "../../scripts/fetch_source.py"


rule fetch_weights:
    """Download a timm or open_clip backbone's pretrained weights once (training jobs only ever read this file)."""
    output:
        layout.FETCHED,
    params:
        code=code("fetch_weights"),
        spec=fetched_weights_spec,
        mirror=DOWNLOAD_MIRROR,
    wildcard_constraints:
        model="|".join(re.escape(m) for m in fetched_weights()) or "(?!)",
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/fetch_weights/{model}.log",
    script:
        "../../scripts/fetch_weights.py"


rule fetch_torchvision_weights:
    """Download torchvision weights a method reads beside its backbone once (MoE-Adapters' AlexNet), kept as
    safetensors (ifcl.models.weights.TORCHVISION)."""
    output:
        layout.FETCHED,
    params:
        code=code("fetch_torchvision_weights"),
        mirror=DOWNLOAD_MIRROR,
    wildcard_constraints:
        model="|".join(re.escape(m) for m in TORCHVISION_WEIGHTS),
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/fetch_torchvision_weights/{model}.log",
    script:
        "../../scripts/fetch_torchvision_weights.py"


rule decode_cifar100:
    """CIFAR-100's python arrays -> PNG files and manifests (decoded once; the raw files stay as they are)."""
    input:
        source_markers,
    output:
        images=directory("data/prepared/{dataset}/images"),
        train="data/prepared/{dataset}/train.csv",
        test="data/prepared/{dataset}/test.csv",
    params:
        code=code("prepare_dataset"),
        spec=dataset_content,
        raw=RAW,
    wildcard_constraints:
        dataset=names_of_type(DATASETS, "cifar100"),
    conda:
        CONDA_ENV
    log:
        "logs/decode_cifar100/{dataset}.log",
    script:
        "../../scripts/prepare_dataset.py"


rule prepare_mtil:
    """An MTIL dataset: train / val / test manifests (CoOp splits; MNIST and CIFAR100 decoded into PNG files)."""
    input:
        source_markers,
    output:
        images=directory("data/prepared/{dataset}/images"),
        train="data/prepared/{dataset}/train.csv",
        val="data/prepared/{dataset}/val.csv",
        test="data/prepared/{dataset}/test.csv",
    params:
        code=code("prepare_dataset"),
        spec=dataset_content,
        raw=RAW,
    wildcard_constraints:
        dataset=names_of_type(DATASETS, "mtil"),
    conda:
        CONDA_ENV
    log:
        "logs/prepare_mtil/{dataset}.log",
    script:
        "../../scripts/prepare_dataset.py"


rule prepare_captions:
    """A captions dataset (ZSCL's reference texts): its source's captions, one per row of captions.csv."""
    input:
        source_markers,
    output:
        captions="data/prepared/{dataset}/captions.csv",
    params:
        code=code("prepare_captions"),
        spec=dataset_content,
        raw=RAW,
    wildcard_constraints:
        dataset=names_of_type(DATASETS, "captions"),
    conda:
        CONDA_ENV
    log:
        "logs/prepare_captions/{dataset}.log",
    script:
        "../../scripts/prepare_captions.py"


rule list_benchmark:
    """ImageNet-R / DomainNet: manifests from the split lists (or the seeded split) over the raw images."""
    input:
        source_markers,
    output:
        train="data/prepared/{dataset}/train.csv",
        test="data/prepared/{dataset}/test.csv",
    params:
        code=code("prepare_dataset"),
        spec=dataset_content,
        raw=RAW,
    wildcard_constraints:
        dataset="|".join(filter(None, [names_of_type(DATASETS, "imagenet-r"), names_of_type(DATASETS, "domainnet")])),
    conda:
        CONDA_ENV
    log:
        "logs/list_benchmark/{dataset}.log",
    script:
        "../../scripts/prepare_dataset.py"


rule generate_dataset:
    """Draw a generated dataset as PNG files in class folders and list them in manifests."""
    output:
        images=directory("data/generated/{dataset}"),
        train="data/prepared/{dataset}/train.csv",
        test="data/prepared/{dataset}/test.csv",
        val="data/prepared/{dataset}/val.csv",
    params:
        code=code("prepare_dataset"),
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
        code=code("prepare_dataset"),
        spec=dataset_content,
        # the folder's files as they are now: an image added, removed or changed re-runs this rule
        fingerprint=lambda wildcards: folder_fingerprint(DATASETS[wildcards.dataset]["path"]),
    wildcard_constraints:
        dataset=names_of_type(DATASETS, "folder"),
    conda:
        CONDA_ENV
    log:
        "logs/folder_manifest/{dataset}.log",
    script:
        "../../scripts/prepare_dataset.py"


rule decode_images:
    """Decode a dataset split once under a deterministic transform into a memory-mapped uint8 array (image_cache)."""
    input:
        lambda wildcards: manifest(wildcards.dataset, wildcards.split),
    output:
        "data/decoded/{dataset}/{split}-{transform}-{size}.npy",
    params:
        code=code("decode_images"),
    wildcard_constraints:
        dataset=r"[^/]+",
        split="train|val|test",
        transform="|".join(DETERMINISTIC),
        size=r"\d+",
    threads: 2
    conda:
        CONDA_ENV
    log:
        "logs/decode_images/{dataset}/{split}-{transform}-{size}.log",
    script:
        "../../scripts/decode_images.py"


rule pretrain_backbone:
    """Pretrain a small ViT on generated classes disjoint from the continual ones (demo backbones)."""
    input:
        train=pretrain_manifest("train"),
        test=pretrain_manifest("test"),
    output:
        weights=f"{layout.PRETRAINED}/{layout.BACKBONE}",
        log_csv=f"{layout.PRETRAINED}/{layout.PRETRAIN_LOG}",
    params:
        code=code("pretrain_backbone"),
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
