# Rule pretrain_clip: a small CLIP pretrained contrastively on captioned generated classes -> backbone.safetensors.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.pretrain_clip import Pretrain, pretrain_clip_backbone

    pretrain_clip_backbone(from_rule(Pretrain, snakemake))
