# Rule pretrain_backbone: a small ViT pretrained on generated classes -> backbone.safetensors.
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.pretrain import pretrain_backbone

    pretrain_backbone(snakemake.params.spec, snakemake.params.dataset, snakemake.input.train, snakemake.input.test,
                      snakemake.output.weights, snakemake.output.log_csv, snakemake.threads)
