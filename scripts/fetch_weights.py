# Rule fetch_weights: a timm model's hub weights -> data/weights/<model>.safetensors (+ its recorded sha256).
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.models.weights import fetch_timm_weights

    sha256 = fetch_timm_weights(snakemake.wildcards.model, snakemake.output[0], snakemake.params.mirror)
    print(f"{snakemake.output[0]}: sha256 {sha256}")
