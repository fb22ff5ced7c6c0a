# Rules generate_dataset / folder_manifest / decode_cifar100 / list_benchmark: a configured dataset -> manifests.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.data.prepare import prepare_dataset

    out, p = snakemake.output, snakemake.params
    prepare_dataset(p.spec, out.train, out.test, getattr(out, "images", None), getattr(p, "raw", "data/raw"),
                    getattr(out, "val", None))
