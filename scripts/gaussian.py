# Rule gaussian: DIKI task t's Gaussian of frozen training features -> gaussian.safetensors.
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.diki_chain import gaussian

    gaussian(snakemake.input[0], snakemake.output[0])
