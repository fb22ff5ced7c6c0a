# Rule fetch_source: data/raw/<source>/ made ready (downloaded, verified, extracted) -> its marker file.
from ifcl.runlog import job

with job(snakemake):
    from pathlib import Path

    from ifcl.data.sources import fetch_source

    marker = Path(snakemake.output[0])
    fetch_source(snakemake.wildcards.source, marker.parent.parent, snakemake.params.mirror)
