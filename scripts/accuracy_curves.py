# Rule accuracy_curves: acc_matrix.csv and metrics.json of every run -> accuracy_curves.{png,pdf} (one panel per
# protocol, each experiment in its colour) and the curves as data (accuracy_curves.json, for `dvc plots show`).
from ifcl.runlog import job

with job(snakemake):
    from ifcl.files import write_json
    from ifcl.plots import curve_records, plot_accuracy_curves, run_curves

    p, out = snakemake.params, snakemake.output
    curves = run_curves(p.runs, p.protocols)
    plot_accuracy_curves({exp: list(by_seed.values()) for exp, by_seed in curves.items()}, p.protocols, p.colours,
                         p.settings, [out.png, out.pdf])
    write_json(out.data, curve_records(curves))
