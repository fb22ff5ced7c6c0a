# Rule fetch_torchvision_weights: torchvision weights a method reads beside its backbone (MoE-Adapters' AlexNet)
# -> data/weights/<name>.safetensors (+ its sha256).
from ifcl.runlog import job

with job(snakemake):
    from ifcl.models.weights import fetch_torchvision_weights

    sha256 = fetch_torchvision_weights(snakemake.wildcards.model, snakemake.output[0], snakemake.params.mirror)
    print(f"{snakemake.output[0]}: sha256 {sha256}")
