# Rule pretrain_backbone: a small ViT pretrained on generated classes -> backbone.safetensors.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.pretrain_vit import Pretrain, pretrain_backbone

    pretrain_backbone(from_rule(Pretrain, snakemake))
