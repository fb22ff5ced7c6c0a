# ifcl: per-task continual-learning pipelines (see README.md and docs/).
# Default config: config/config.yaml; `--configfile X` replaces it (it is not merged with the default).
from snakemake.utils import min_version

min_version("9.19")


if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/cil.smk"
include: "workflow/rules/mtil.smk"
include: "workflow/rules/tasks.smk"
include: "workflow/rules/state.smk"
include: "workflow/rules/diki.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/moe.smk"
include: "workflow/rules/results.smk"
include: "workflow/rules/figures.smk"


rule all:
    """Everything: every run's files, the summary tables and the figures (what `snakemake --report` shows)."""
    default_target: True
    input:
        run_targets(),
        rules.summarize.output,
        figure_targets(),


rule runs:
    """Every run's files (per-task states, evaluations, matrices and metrics), without the summary and figures:
    the target of dvc.yaml's pipeline stage."""
    input:
        run_targets(),


rule data:
    """Every file under data/ that the configured runs read: datasets fetched and prepared, weights fetched. Then
    `dvc add data` tracks it as data.dvc, so other machines pull it instead (docs/reproducibility.md)."""
    input:
        data_targets(),
