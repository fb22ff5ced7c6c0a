# Rules train_autoencoder and train_reference_autoencoder: one DDAS autoencoder of MoE-Adapters (task t's, or the
# reference one) -> autoencoder.safetensors / reference_autoencoder.safetensors.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.moe_adapters import TrainAutoencoder, train_autoencoder

    train_autoencoder(from_rule(TrainAutoencoder, snakemake))
