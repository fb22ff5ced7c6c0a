# Rule memory_sizes: an InfLoRA run's memory.safetensors after each task -> the old tasks' space per adapted block
# against the task, in shades of the experiment's colour (PNG and PDF).
from ifcl.runlog import job

with job(snakemake):
    from ifcl.plots import memory_dimensions, plot_memory_sizes
    from ifcl.state import load_state

    states = [load_state(path) for path in snakemake.input]
    layers, dims, kinds = memory_dimensions([meta for _, meta in states])
    width = next(iter(states[0][0].values())).shape[0]  # each basis is [layer width, k]
    w, p = snakemake.wildcards, snakemake.params
    plot_memory_sizes(layers, dims, kinds, width, f"{w.exp}, seed {w.seed}: InfLoRA's memory", p.colour, p.settings,
                      list(snakemake.output))
