# Rule gaussian: DIKI task t's Gaussian of frozen training features -> gaussian.safetensors.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.runtime import from_rule
    from ifcl.steps.diki import Gaussian, gaussian

    gaussian(from_rule(Gaussian, snakemake))
