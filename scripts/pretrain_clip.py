# Rule pretrain_clip: a small CLIP pretrained contrastively on captioned generated classes -> backbone.safetensors.
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.pretrain import pretrain_clip_backbone

    pretrain_clip_backbone(snakemake.params.spec, snakemake.params.dataset, snakemake.input.train, snakemake.input.test,
                           snakemake.output.weights, snakemake.output.log_csv, snakemake.threads)
