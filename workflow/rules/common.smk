# Config loading and validation, path helpers and input functions shared by the rule files.
import os
import re
import subprocess
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

# The library next to this workflow is the one every job uses (also inside the conda environment below and in
# SLURM jobs, which receive the variables named by `envvars`).
SRC = os.path.join(workflow.basedir, "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))


envvars:
    "PYTHONPATH",


# Jobs run on this machine are forked from one process that has imported torch, timm and open_clip once, instead
# of each importing them anew (ifcl.stepserver); IFCL_STEP_SERVER=off runs every job in a process of its own.
from ifcl import stepserver
from ifcl.status import start_console
from ifcl.dvclock import record_after_run

_step_server = []
_console = []


onstart:
    if getattr(workflow.executor_plugin, "name", None) == "local" and stepserver.available():
        _step_server.append(stepserver.start())
    # a line a minute naming the running jobs, their epoch, loss and ETA (from their status files)
    _console.append(start_console(interval=float(os.environ.get("IFCL_CONSOLE_SECONDS", 60))))


onsuccess:
    for server in _step_server:
        stepserver.stop(server)
    for stop in _console:
        stop.set()
    # what this run made, recorded in dvc.lock: `dvc exp run` resets outputs to what dvc.lock records (ifcl.dvclock)
    record_after_run()


onerror:
    for server in _step_server:
        stepserver.stop(server)
    for stop in _console:
        stop.set()
    # what this run made, recorded in dvc.lock: `dvc exp run` resets outputs to what dvc.lock records (ifcl.dvclock)
    record_after_run()


# The software of every rule, for --software-deployment-method conda (paths relative to workflow/rules/).
CONDA_ENV = "../../envs/ifcl.yaml"

from ifcl import layout
from ifcl.codeversion import code_version
from ifcl.plan import group_pattern
from ifcl.integrity import check_workdir, snakemake_cli_args, snakemake_command, snakemake_runs_jobs
from ifcl.config import ConfigError, canonical, check, merge_includes, paper_configs, task_train_params, validate_with_defaults
from ifcl.registry import RegistryError, method_code as _method_code, method_of, model_settings, num_tasks, protocol_of, task_files
from ifcl.data.benchmarks import sources_of
from ifcl.data.folder import folder_fingerprint
from ifcl.plots import experiment_colours, load_settings as figure_settings
from ifcl.results import check_published, load_published, protocol_changes
from ifcl.data.transforms import DETERMINISTIC, decoded_file
from ifcl.data.sources import MARKER as SOURCE_MARKER, SOURCES
from ifcl.models.weights import TORCHVISION as TORCHVISION_WEIGHTS, backbone_weights_file, weights_name

# Includes merged, the schema's checks (defaults filled in) and the cross-checks: every error names the key (and
# the closest valid name of a misspelled one), before any job runs.
try:
    _merged = merge_includes(config)
    config.clear()
    config.update(_merged)
    validate_with_defaults(config)
    check(config)
except ConfigError as e:
    _files = ", ".join(map(str, workflow.overwrite_configfiles or ["config/config.yaml"]))
    raise WorkflowError(f"Invalid configuration ({_files}): {e}")
except RegistryError as e:
    raise WorkflowError(f"A method declaration cannot be read: {e}")
# sorted keys everywhere: Snakemake compares dict params in recorded (sorted) order (see ifcl.config.canonical)
_canonical = canonical(config)
config.clear()
config.update(_canonical)

# Before Snakemake plans anything: damaged result files are moved aside (and so regenerated), and outputs whose
# inputs changed content are marked for re-running whatever the timestamps (ifcl.integrity; `ifcl check` by hand).
# Not in the processes of single jobs, and not while another Snakemake works in this directory (it holds locks).
# A start that runs no job (a dry run, --lint, --report, a graph, ...) moves nothing: it says what would move (it
# does set the timestamps of stale outputs, whose content it leaves alone, so that the plan shows their re-runs).
if workflow.is_main_process and not any(Path(".snakemake/locks").glob("*.lock")):
    _argv = snakemake_cli_args()  # None: Snakemake started from Python (only its dry-run setting is known)
    _report_only = workflow.output_settings.dryrun or (_argv is not None and not snakemake_runs_jobs(_argv))
    _checked = check_workdir(dry_run=_report_only, mark_stale=True)
    for line in _checked.lines(dry_run=_report_only):
        print(line, file=sys.stderr)
    MOVED = set() if _report_only or _argv is None else {path for path, _, _ in _checked.moved}
else:
    MOVED = set()


DATASETS = config["datasets"]
BACKBONES = config["backbones"]
EXPERIMENTS = config["experiments"]
RAW = "data/raw"
DOWNLOAD_MIRROR = (config.get("downloads") or {}).get("mirror")
JOB_GROUPS = config.get("job_groups", "run")


def job_group(per_task=True):
    """The job group of a run's rule (config key job_groups; docs/running.md). On a cluster the jobs of one group
    that depend on one another are submitted together: `run` (the default) makes every run's chain after its shared
    inputs (data, backbones, frozen features) one submission, `task` each task's jobs, `none` every job its own
    (ifcl.plan.group_pattern). A run on this machine has no groups: Snakemake ignores them there but would still
    pay for them in its scheduling (5 s of a 10 s dry run of config/config.yaml)."""
    pattern = group_pattern(JOB_GROUPS, per_task)

    def group(wildcards):
        if pattern is None or (workflow.local_exec and not workflow.remote_exec):
            return None
        return pattern.format(**wildcards)

    return group


# In a cluster job (Snakemake started by the SLURM plugin on the node, for a group or a single job), GPU jobs may
# use the GPUs the job was given, no more: the node's Snakemake then sizes the group's job step as the submitting
# Snakemake sized the submission (profiles/slurm: gpu=1 per submission), and runs as many GPU jobs at once as there
# are devices, each leasing its own (ifcl.gpu).
if workflow.remote_exec and os.environ.get("SLURM_JOB_ID") and "gpu" not in workflow.global_resources:
    workflow.register_resource(
        "gpu", len([d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip() not in ("", "-1")]))


def code(script):
    """Digest of scripts/<script>.py and of the ifcl modules it imports: a rule passes it as a parameter, so its
    jobs re-run when the code they run changed, and only then (see ifcl.codeversion)."""
    return code_version(os.path.join(workflow.basedir, "scripts", f"{script}.py"), SRC)


_METHOD_CODE = {}


def method_code(script):
    """Params function of a rule that runs the steps of the wildcard's method through the registry (the state
    chain): the digest of the script and that of the method's own implementation modules (ifcl.registry), so an
    edit to one method's modules re-runs its jobs and no other method's."""
    base = code(script)

    def value(wildcards):
        name = EXPERIMENTS[wildcards.exp]["method"]
        if name not in _METHOD_CODE:
            _METHOD_CODE[name] = _method_code(method_of(EXPERIMENTS[wildcards.exp]), SRC)
        return f"{base}+{_METHOD_CODE[name]}"

    return value


wildcard_constraints:
    exp="[^/]+",
    seed=r"\d+",
    t=r"\d+",
    dataset="[^/]+",
    backbone="[^/]+",


def experiments_where(keep):
    """Regex matching exactly the experiments for which keep(spec) holds (never matches if there are none)."""
    names = [n for n, spec in EXPERIMENTS.items() if keep(spec)]
    return "|".join(re.escape(n) for n in names) if names else "(?!)"


def chain_experiments(protocol, chain):
    """Regex of the experiments whose method runs the chain ``chain`` of ``protocol``'s rules (ifcl.registry.CHAINS):
    the rules of a chain are constrained to its experiments, so they never match another chain's runs."""
    return experiments_where(lambda spec: method_of(spec).protocol == protocol and method_of(spec).chain == chain)


def names_of_type(registry, kind):
    """Regex matching exactly the registry names of one type (never matches if there are none)."""
    names = [n for n, spec in registry.items() if spec["type"] == kind]
    return "|".join(re.escape(n) for n in names) if names else "(?!)"


# the manifests each type of dataset has (the others: train and test)
DATASET_SPLITS = {"mtil": ("train", "val", "test"), "generated": ("train", "val", "test"), "captions": ("captions",)}

NON_CONTENT_KEYS = ("train_transform", "test_transform", "crop_scale", "template")


def dataset_content(wildcards):
    """What determines a dataset's files (transforms and prompt template only matter to the steps that use images)."""
    return canonical({k: v for k, v in DATASETS[wildcards.dataset].items() if k not in NON_CONTENT_KEYS})


def manifest(dataset, split):
    return layout.manifest_file(dataset, split)


def backbone_weights(name):
    """The weights file of a backbone: pretrained here, given by the user, or fetched to data/weights/."""
    return backbone_weights_file(name, BACKBONES[name])


def fetched_weights():
    """{file stem under data/weights/: backbone spec} of the timm / open_clip backbones without a local weights file."""
    return {weights_name(s): canonical({k: v for k, v in s.items() if k in ("type", "name", "pretrained")})
            for s in BACKBONES.values() if s["type"] in ("timm", "open_clip") and not s.get("weights")}


def fetched_weights_spec(wildcards):
    return fetched_weights()[wildcards.model]


def source_markers(wildcards):
    """The raw sources a paper benchmark is built from, each ready once its marker exists."""
    return [f"data/raw/{s}/{SOURCE_MARKER}" for s in sources_of(DATASETS[wildcards.dataset])]


def exp_dataset(wildcards):
    return DATASETS[EXPERIMENTS[wildcards.exp]["dataset"]]


def exp_backbone(wildcards):
    return BACKBONES[EXPERIMENTS[wildcards.exp]["backbone"]]


def exp_backbone_weights(wildcards):
    return backbone_weights(EXPERIMENTS[wildcards.exp]["backbone"])


def exp_setting(key):
    """Params function: one setting of the wildcard's experiment."""
    def value(wildcards):
        return EXPERIMENTS[wildcards.exp][key]

    return value


def exp_manifest(split):
    def files(wildcards):
        return manifest(EXPERIMENTS[wildcards.exp]["dataset"], split)

    return files


def decoded_images(exp, dataset, split, transform):
    """The decoded-image cache a step of experiment ``exp`` reads for a dataset split under ``transform``:
    with image_cache deterministic, for the deterministic transforms; with all, also for random crops."""
    spec = EXPERIMENTS[exp]
    if spec["image_cache"] == "none" or (transform not in DETERMINISTIC and spec["image_cache"] != "all"):
        return []
    return decoded_file(dataset, split, transform, BACKBONES[spec["backbone"]]["image_size"])


def exp_decoded(split, transform_key):
    """The cache of the experiment's dataset split under its train_transform or test_transform, if it uses one."""
    def files(wildcards):
        dataset = EXPERIMENTS[wildcards.exp]["dataset"]
        return decoded_images(wildcards.exp, dataset, split, DATASETS[dataset][transform_key])

    return files


def run_file(wildcards, t, name):
    """File ``name`` of task t of the wildcards' run."""
    return layout.task_file(wildcards.exp, wildcards.seed, t, name)


def task_images(wildcards):
    """Params function of the state chain's training rule: which transform its task pass applies (the method's
    ``task_images``: train_transform, or test_transform for a closed-form fit)."""
    return method_of(EXPERIMENTS[wildcards.exp]).task_images


def train_drop_last(wildcards):
    """Params function of the state chain's training rule: whether its loader drops the last partial batch (the
    method's ``drop_last``, as its official loader)."""
    return method_of(EXPERIMENTS[wildcards.exp]).drop_last


def task_images_decoded(wildcards):
    """The decoded-image cache of the training images under that transform, if the experiment uses one."""
    return exp_decoded("train", task_images(wildcards))(wildcards)


def statistics_images(wildcards):
    """Params function of the state chain's training rule: the transform of the pass over the task's training images
    after training that gives the model's ``end_task`` its class statistics (the method's ``statistics_images``;
    None: no such pass)."""
    return method_of(EXPERIMENTS[wildcards.exp]).statistics_images


def statistics_images_decoded(wildcards):
    """The decoded-image cache of the training images under that transform, if there is such a pass and a cache."""
    transform = statistics_images(wildcards)
    return [] if transform is None else exp_decoded("train", transform)(wildcards)


def model_params(wildcards):
    """The experiment settings that shape the model: the method, backbone and the method's model keys (a change
    re-runs every task of the experiment; ifcl.registry.model_settings)."""
    return canonical(model_settings(EXPERIMENTS[wildcards.exp]))


def tasks_before(name):
    """Input function: file ``name`` of every task before the wildcard's task (the finished tasks)."""
    def files(wildcards):
        return [run_file(wildcards, s, name) for s in range(int(wildcards.t))]

    return files


def tasks_through(name):
    """Input function: file ``name`` of every task up to the wildcard's task, itself included."""
    def files(wildcards):
        return [run_file(wildcards, s, name) for s in range(int(wildcards.t) + 1)]

    return files


def run_evals(wildcards):
    """The run's per-task evaluations, and for MTIL the frozen test features (they hold the zero-shot accuracy)."""
    spec = EXPERIMENTS[wildcards.exp]
    inputs = {"evals": evals(wildcards)}
    if protocol_of(spec).name == "mtil":
        inputs["zero_shot"] = [features(spec["backbone"], ds, "test") for ds in protocol_of(spec).datasets(spec)]
    return inputs


def evals(wildcards):
    """The run's eval.json of every task, in task order."""
    return [run_file(wildcards, t, layout.EVAL) for t in range(num_tasks(EXPERIMENTS[wildcards.exp]))]


def features(backbone, dataset, split):
    return layout.features_file(backbone, dataset, split)


def pretrain_manifest(split):
    def files(wildcards):
        return manifest(BACKBONES[wildcards.backbone]["pretrain"]["dataset"], split)

    return files


def train_params(wildcards):
    return canonical(task_train_params(EXPERIMENTS[wildcards.exp], int(wildcards.t)))


def run_targets():
    """Every file of every run, per-task files included: a deleted task file is regenerated (with what depends
    on it), never silently skipped because the run's final results still exist."""
    targets = []
    for exp, spec in EXPERIMENTS.items():
        for seed in spec["seeds"]:
            names = [layout.ACC_MATRIX, layout.METRICS, *protocol_of(spec).run_files]
            targets += [layout.run_file(exp, seed, name) for name in names]
            targets += [layout.task_file(exp, seed, t, name) for t in range(num_tasks(spec))
                        for name in task_files(spec, t)]
    return targets


def data_targets():
    """Every file under data/ that the configured runs read: the manifests of each dataset an experiment or a
    pretrained backbone uses (with the images and raw sources they are made from) and the fetched weights. The
    target `snakemake data`, which `dvc add data` then tracks as data.dvc."""
    used = {EXPERIMENTS[exp]["backbone"] for exp in EXPERIMENTS}
    datasets = {ds for spec in EXPERIMENTS.values()
                for ds in protocol_of(spec).datasets(spec) + list(method_of(spec).datasets_read(spec))}
    datasets |= {BACKBONES[b]["pretrain"]["dataset"] for b in used if "pretrain" in BACKBONES[b]}
    manifests = [manifest(ds, split) for ds in sorted(datasets)
                 for split in DATASET_SPLITS.get(DATASETS[ds]["type"], ("train", "test"))]
    weights = sorted({backbone_weights(b) for b in used} & {layout.FETCHED.format(model=m) for m in fetched_weights()})
    # and the files under data/weights/ a method reads beside its backbone's (ifcl.registry.Method.weights)
    weights += sorted({w for spec in EXPERIMENTS.values() for w in method_of(spec).weights(spec)})
    return manifests + weights


def shared_inputs():
    """The files the configured runs read besides data/ and their own files: the pretrained backbones, DIKI's frozen
    features and the raw sources' markers."""
    used = {EXPERIMENTS[exp]["backbone"] for exp in EXPERIMENTS}
    files = [layout.pretrained_file(b, name) for b in used if BACKBONES[b]["type"] in ("pretrain", "pretrain_clip")
             for name in (layout.BACKBONE, layout.PRETRAIN_LOG)]
    mtil = [spec for spec in EXPERIMENTS.values() if protocol_of(spec).name == "mtil"]
    files += [features(spec["backbone"], ds, split) for spec in mtil for ds in protocol_of(spec).datasets(spec)
              for split in ("train", "test")]
    datasets = {ds for spec in EXPERIMENTS.values()
                for ds in protocol_of(spec).datasets(spec) + list(method_of(spec).datasets_read(spec))}
    files += [f"{RAW}/{s}/{SOURCE_MARKER}" for ds in datasets for s in sources_of(DATASETS[ds])]
    return files


def run_results():
    """acc_matrix.csv and metrics.json of every run, by experiment and seed."""
    return {exp: {s: {"matrix": layout.run_file(exp, s, layout.ACC_MATRIX),
                      "metrics": layout.run_file(exp, s, layout.METRICS)} for s in EXPERIMENTS[exp]["seeds"]}
            for exp in EXPERIMENTS}


def protocols():
    return {exp: protocol_of(spec).name for exp, spec in EXPERIMENTS.items()}


# Plot settings: the figures section of DVC's parameter file next to the Snakefile (defaults where it is absent).
try:
    FIGURE_SETTINGS = figure_settings(os.path.join(workflow.basedir, "params.yaml"))
except ValueError as e:
    raise WorkflowError(f"Invalid figure settings: {e}")

# The published numbers the summary compares with (a parameter of the summarize rule, so an edit re-runs it).
try:
    PUBLISHED = canonical(load_published(os.path.join(workflow.basedir, "config", "published.yaml")))
    check_published(PUBLISHED, EXPERIMENTS)
except ValueError as e:
    raise WorkflowError(f"Invalid published numbers: {e}")

def protocol_changes_of_runs(wildcards):
    """Params function of the summarize rule: where a configured experiment with published numbers differs from the
    paper config of the same name (the protocol those numbers were measured under), so that the summary marks the
    comparison and names the settings. Computed only for that job: reading the paper configs takes a few tenths
    of a second, which every start (a SLURM job's too) would otherwise pay."""
    if not set(PUBLISHED) & set(EXPERIMENTS):
        return {}
    return protocol_changes(config, paper_configs(workflow.basedir), PUBLISHED)


# ---- figures ----

FIGURES = layout.FIGURES
RUN_FIGURES = layout.RUN_FIGURES


def has_forgetting(spec):
    """Class-incremental experiments with old tasks to forget."""
    return protocol_of(spec).has_forgetting(spec)


FORGETTING_EXPERIMENTS = experiments_where(has_forgetting)
# the experiments with a method's own per-run figure (ifcl.registry.Method.run_figures)
MEMORY_EXPERIMENTS = experiments_where(lambda spec: "memory" in method_of(spec).figures(spec))
LAMBDA_EXPERIMENTS = experiments_where(lambda spec: "lambda" in method_of(spec).figures(spec))

# One colour per experiment in every figure: the palette of ifcl.plots in the order of the configured experiments
# (the config's order, keys sorted), so a figure that shows some of them gives each the same colour as the others.
EXPERIMENT_COLOURS = canonical(experiment_colours(list(EXPERIMENTS)))


def experiment_colour(wildcards):
    """Params function: the colour of the wildcard's experiment (a figure of one experiment re-runs only when its
    own colour changes)."""
    return EXPERIMENT_COLOURS[wildcards.exp]


def figure_targets():
    """Every figure (PNG and PDF) and the accuracy and training curves as data."""
    targets = [f"{FIGURES}/accuracy_curves.{ext}" for ext in ("png", "pdf", "json")]
    targets += [f"{FIGURES}/overview.{ext}" for ext in ("png", "pdf")]
    targets.append(f"{FIGURES}/training_curves.json")
    for exp, spec in EXPERIMENTS.items():
        names = ["acc_matrix", "training", *method_of(spec).figures(spec)]
        for seed in spec["seeds"]:
            run = RUN_FIGURES.format(exp=exp, seed=seed)
            targets += [f"{run}/{name}.{ext}" for name in names for ext in ("png", "pdf")]
        if has_forgetting(spec):
            targets += [f"{FIGURES}/{exp}/forgetting.{ext}" for ext in ("png", "pdf")]
    return targets


def matrix_labels(wildcards):
    """Names of the rows and columns of a run's accuracy matrix: MTIL's datasets (class-incremental: none, the
    script numbers the tasks)."""
    spec = EXPERIMENTS[wildcards.exp]
    return protocol_of(spec).matrix_labels(spec)


def seed_matrices(wildcards):
    return [layout.run_file(wildcards.exp, s, layout.ACC_MATRIX) for s in EXPERIMENTS[wildcards.exp]["seeds"]]


def memory_files(wildcards):
    """An InfLoRA run's memory after each task but the last."""
    return [run_file(wildcards, t, layout.MEMORY) for t in range(EXPERIMENTS[wildcards.exp]["num_tasks"] - 1)]


def train_logs(wildcards):
    """The run's train_log.csv of every task, in task order."""
    return [run_file(wildcards, t, layout.TRAIN_LOG) for t in range(num_tasks(EXPERIMENTS[wildcards.exp]))]


def all_train_logs():
    """train_log.csv of every task of every run, by experiment and seed."""
    return {exp: {s: [layout.task_file(exp, s, t, layout.TRAIN_LOG) for t in range(num_tasks(spec))]
                  for s in spec["seeds"]} for exp, spec in EXPERIMENTS.items()}


def task_labels(wildcards):
    """The names of a run's tasks in the figures: MTIL's datasets, class-incremental "task 0", "task 1", ..."""
    spec = EXPERIMENTS[wildcards.exp]
    return protocol_of(spec).task_labels(spec)


def log_columns(wildcards_or_exp):
    """The train_log.csv columns of the experiment's epoch, loss and accuracy (ifcl.registry.Method.log_column)."""
    exp = getattr(wildcards_or_exp, "exp", wildcards_or_exp)
    m = method_of(EXPERIMENTS[exp])
    return {name: m.log_column(name) for name in ("epoch", "loss", "accuracy")}


def method_settings(wildcards):
    """Params function: the experiment's own keys of its method (its settings class: ifcl.registry.Method.keys)."""
    spec = EXPERIMENTS[wildcards.exp]
    return canonical({k: spec[k] for k in method_of(spec).keys() if k in spec})


# ---- the MTIL protocol (mtil.smk) ----

def sequence_dataset(wildcards):
    """Dataset t of the wildcard's experiment's sequence (its task t)."""
    return EXPERIMENTS[wildcards.exp]["sequence"][int(wildcards.t)]


def prompt_spec(dataset):
    """What of a dataset a CLIP step uses besides its images: the prompt template (CLIP preprocessing is fixed)."""
    return {"template": DATASETS[dataset].get("template")}


# ---- InfLoRA's chain (tasks.smk; ifcl.catalog.inflora) ----

from ifcl.catalog.inflora import aligned_heads_task, uses_memory


def aligned_heads(wildcards):
    """InfLoRA+CA: the aligned heads after the wildcard's task, when it is >= 1."""
    t = int(wildcards.t)
    return run_file(wildcards, t, layout.ALIGNED_HEADS) if aligned_heads_task(EXPERIMENTS[wildcards.exp], t) else []


def previous_aligned_heads(wildcards):
    t = int(wildcards.t) - 1
    return run_file(wildcards, t, layout.ALIGNED_HEADS) if aligned_heads_task(EXPERIMENTS[wildcards.exp], t) else []


def previous_memory(wildcards):
    """InfLoRA: the memory after task t-1 (none for task 0 and for methods without memory)."""
    t = int(wildcards.t)
    if not uses_memory(EXPERIMENTS[wildcards.exp]) or t == 0:
        return []
    return run_file(wildcards, t - 1, layout.MEMORY)


def reduction_inputs(wildcards):
    """seq-lora draws R_t at random; InfLoRA designs it from the task's data, the finished tasks and the memory."""
    inputs = {"tasks": layout.run_file(wildcards.exp, wildcards.seed, layout.TASKS),
              "weights": exp_backbone_weights(wildcards)}
    if uses_memory(EXPERIMENTS[wildcards.exp]):
        inputs.update(manifest=exp_manifest("train")(wildcards), reductions=tasks_before(layout.REDUCTION)(wildcards),
                      adapters=tasks_before(layout.ADAPTER)(wildcards), previous_memory=previous_memory(wildcards),
                      decoded=exp_decoded("train", "train_transform")(wildcards))
    return inputs


def collect_params(wildcards):
    """What an InfLoRA collection pass over task t's training images depends on (batch size and transforms)."""
    if not uses_memory(EXPERIMENTS[wildcards.exp]):
        return None
    return canonical({"batch_size": train_params(wildcards)["batch_size"], "dataset": exp_dataset(wildcards)})


# ---- DIKI's chain (diki.smk; ifcl.catalog.diki) ----

def diki_train_inputs(wildcards):
    spec = EXPERIMENTS[wildcards.exp]
    ds = sequence_dataset(wildcards)
    inputs = {"weights": backbone_weights(spec["backbone"]), "manifest": manifest(ds, "train")}
    if DATASETS[ds]["type"] == "mtil" or DATASETS[ds].get("val_per_class"):
        inputs["val"] = manifest(ds, "val")
    if spec["image_cache"] != "none":  # CLIP's preprocessing is deterministic: cached from `deterministic` on
        inputs["decoded_train"] = decoded_images(wildcards.exp, ds, "train", "clip")
        if "val" in inputs:
            inputs["decoded_val"] = decoded_images(wildcards.exp, ds, "val", "clip")
    t = int(wildcards.t)
    if spec["rng"] == "sequential" and t > 0:  # the random stream continues from the previous task
        inputs["previous"] = run_file(wildcards, t - 1, layout.PREFIX)
    return inputs


# ---- the MTIL full fine-tuning family's chain (finetune.smk; ifcl.catalog.zscl) ----

def finetune_train_inputs(wildcards):
    spec = EXPERIMENTS[wildcards.exp]
    ds, t = sequence_dataset(wildcards), int(wildcards.t)
    inputs = {"weights": backbone_weights(spec["backbone"]), "manifest": manifest(ds, "train")}
    if t > 0:
        inputs["previous"] = run_file(wildcards, t - 1, layout.STATE)
    if spec["image_cache"] != "none" and spec["train"]["transform"] == "clip":  # clip-train reads the image files
        inputs["decoded"] = decoded_images(wildcards.exp, ds, "train", "clip")
    if "reference" in spec:  # ZSCL: its reference images and texts
        images, texts = spec["reference"]["images"], spec["reference"]["texts"]
        inputs["reference_images"] = manifest(images, "train")
        inputs["reference_texts"] = manifest(texts, "captions" if DATASETS[texts]["type"] == "captions" else "train")
    if t > 0 and layout.MEMORY in task_files(spec, t - 1):  # iCaRL: the exemplars of the earlier datasets, and where
        # their images are
        inputs["memory"] = run_file(wildcards, t - 1, layout.MEMORY)
        inputs["memory_manifests"] = [manifest(d, "train") for d in spec["sequence"][:t]]
    return inputs


def reference_template(wildcards):
    """ZSCL: the prompt template of its reference texts when they are an image dataset's class prompts."""
    spec = EXPERIMENTS[wildcards.exp]
    return prompt_spec(spec["reference"]["texts"]) if "reference" in spec else None


def diki_eval_inputs(wildcards):
    spec = EXPERIMENTS[wildcards.exp]
    return {
        "weights": backbone_weights(spec["backbone"]),
        "gaussians": tasks_through(layout.GAUSSIAN)(wildcards),
        "prefixes": tasks_through(layout.PREFIX)(wildcards),
        "tests": [manifest(ds, "test") for ds in spec["sequence"]],
        "features": [features(spec["backbone"], ds, "test") for ds in spec["sequence"]],
        "decoded": [decoded_images(wildcards.exp, ds, "test", "clip") for ds in spec["sequence"]]
        if spec["image_cache"] != "none" else [],
    }


# ---- MoE-Adapters' chain (moe.smk; ifcl.catalog.moe_adapters) ----

from ifcl.catalog.moe_adapters import AUTOENCODER_KEYS


def moe_decoded(wildcards, dataset, split):
    """The decoded-image cache of a split the chain reads, when the images it reads are cached: the test images
    (CLIP's preprocessing), the training images only under train.transform clip (clip-train reads the files)."""
    spec = EXPERIMENTS[wildcards.exp]
    if spec["image_cache"] == "none" or (split == "train" and spec["train"]["transform"] != "clip"):
        return []
    return decoded_images(wildcards.exp, dataset, split, "clip")


def moe_extractor_weights(wildcards):
    """The weights of DDAS's extractor, if it has any (ifcl.registry.Method.weights)."""
    return list(method_of(EXPERIMENTS[wildcards.exp]).weights(EXPERIMENTS[wildcards.exp]))


def moe_train_inputs(wildcards):
    spec = EXPERIMENTS[wildcards.exp]
    ds, t = sequence_dataset(wildcards), int(wildcards.t)
    inputs = {"weights": backbone_weights(spec["backbone"]), "manifest": manifest(ds, "train"),
              "decoded": moe_decoded(wildcards, ds, "train")}
    if t > 0:
        inputs["previous"] = run_file(wildcards, t - 1, layout.STATE)
    return inputs


def moe_autoencoder_inputs(dataset):
    """Input function of an autoencoder rule: ``dataset(wildcards)``'s training images and the extractor's weights."""
    def inputs(wildcards):
        ds = dataset(wildcards)
        return {"manifest": manifest(ds, "train"), "decoded": moe_decoded(wildcards, ds, "train"),
                "extractor_weights": moe_extractor_weights(wildcards)}

    return inputs


def moe_autoencoder_settings(wildcards):
    """What the autoencoders' training reads of the experiment's ddas (the threshold and the rest of the choice
    only the evaluation reads)."""
    return canonical({k: EXPERIMENTS[wildcards.exp]["ddas"][k] for k in AUTOENCODER_KEYS})


def moe_training_images(wildcards):
    train = EXPERIMENTS[wildcards.exp]["train"]
    return canonical({"transform": train["transform"], "crop_scale": train["crop_scale"]})


def moe_eval_inputs(wildcards):
    spec = EXPERIMENTS[wildcards.exp]
    return {
        "weights": backbone_weights(spec["backbone"]),
        "state": run_file(wildcards, int(wildcards.t), layout.STATE),
        "autoencoders": tasks_through(layout.AUTOENCODER)(wildcards),
        "reference": run_file(wildcards, 0, layout.REFERENCE_AUTOENCODER),
        "extractor_weights": moe_extractor_weights(wildcards),
        "tests": [manifest(ds, "test") for ds in spec["sequence"]],
        "decoded": [moe_decoded(wildcards, ds, "test") for ds in spec["sequence"]]
        if spec["image_cache"] != "none" else [],
    }


# What the check moved aside that the configured runs read is regenerated now, by a Snakemake of its own with this
# one's options, before this one plans: planned here, the jobs that read it would all re-run, while regenerated
# first it has the content they were made from (Snakemake compares inputs by checksum), and nothing else re-runs.
# Left to Snakemake alone, a missing file that other outputs were made from is regenerated only once a job reading
# it re-runs for another reason (the file would stay missing, and data/ differ from data.dvc).
_regenerate = sorted(MOVED & {*run_targets(), *data_targets(), *shared_inputs()})
if _regenerate and not os.environ.get("IFCL_REGENERATING"):
    print(f"ifcl check: regenerating what was moved aside, before planning this run: {' '.join(_regenerate)}",
          file=sys.stderr)
    _cmd = snakemake_command(_argv, _regenerate)
    if subprocess.run(_cmd, env={**os.environ, "IFCL_REGENERATING": "1"}).returncode != 0:
        raise WorkflowError(f"ifcl check moved files aside that could not be regenerated; see above, or run "
                            f"`snakemake {' '.join(_regenerate)}` (the originals are under quarantine/)")
