# Rule frozen_features: frozen CLIP image features of one dataset split -> features.safetensors.
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.diki_chain import frozen_features

    p = snakemake.params
    frozen_features(p.backbone, snakemake.input.backbone, p.dataset, snakemake.input.images, snakemake.output[0],
                    threads=snakemake.threads)
