# Rule training_curves_data: every run's train_log.csv files -> training_curves.json, one record per epoch of every
# task of every run (for `dvc plots show`).
from ifcl.runlog import job

with job(snakemake):
    from ifcl.files import read_csv, write_json
    from ifcl.plots import training_log, training_records

    p = snakemake.params
    logs = {exp: {int(seed): training_log([read_csv(path) for path in paths], p.columns[exp])
                  for seed, paths in by_seed.items()} for exp, by_seed in p.logs.items()}
    write_json(snakemake.output[0], training_records(logs))
