# Rule generate_dataset / folder_manifest: a configured dataset -> train/test manifests.
from ifcl.runlog import logging_to

with logging_to(snakemake.log[0]):
    from ifcl.data.manifest import prepare_dataset

    out = snakemake.output
    prepare_dataset(snakemake.params.spec, out.train, out.test, getattr(out, "images", None))
