# Rule fetch_weights: a timm or open_clip backbone's hub weights -> data/weights/<model>.safetensors (+ its sha256).
from ifcl.runlog import job

with job(snakemake):
    from ifcl.models.weights import fetch_weights

    sha256 = fetch_weights(snakemake.params.spec, snakemake.output[0], snakemake.params.mirror)
    print(f"{snakemake.output[0]}: sha256 {sha256}")
