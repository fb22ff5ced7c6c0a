# Rule decode_images: one dataset split decoded under a deterministic transform -> data/decoded/...npy.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.data.decoded import write_decoded

    w = snakemake.wildcards
    write_decoded(snakemake.input[0], w.transform, int(w.size), snakemake.output[0], snakemake.threads)
