# Rule split_tasks: class order and classes per task -> tasks.json.
from ifcl.runlog import job

with job(snakemake):
    from ifcl.data.splits import write_tasks

    p = snakemake.params
    write_tasks(snakemake.input.train, p.num_tasks, p.class_order, int(snakemake.wildcards.seed), snakemake.output[0])
