# Rule pretrain_clip: a small CLIP pretrained contrastively on captioned generated classes -> backbone.safetensors.
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.runtime import from_rule
    from ifcl.steps.pretrain_clip import Pretrain, pretrain_clip_backbone

    pretrain_clip_backbone(from_rule(Pretrain, snakemake))
