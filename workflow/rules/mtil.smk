# The MTIL protocol's own rules (ifcl.protocols.MTIL): the frozen CLIP's features and zero-shot accuracy of every
# dataset split, read by the aggregation (Transfer is measured against zero-shot) and by its methods' chains
# (diki.smk).


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
