# Rule prepare_captions: a captions dataset's source -> data/prepared/<dataset>/captions.csv.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.data.captions import source_captions, write_captions

    captions = source_captions(snakemake.params.spec, snakemake.params.raw)
    write_captions(snakemake.output.captions, captions)
    print(f"{len(captions)} captions")
