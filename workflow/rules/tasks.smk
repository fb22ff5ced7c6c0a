# The per-task chain of one run: split -> for each task t: reduction_t -> train_t (-> memory_t) -> evaluate_t.
# A task's rules take the files of tasks < t as inputs, so the DAG is explicit and a changed parameter re-runs
# exactly the tasks it affects and their dependants.


rule split_tasks:
    """Class order and the classes of each task (tasks.json)."""
    input:
        train=exp_manifest("train"),
    output:
        "results/runs/{exp}/seed{seed}/tasks.json",
    params:
        code=code("split_tasks"),
        num_tasks=lambda wildcards: EXPERIMENTS[wildcards.exp]["num_tasks"],
        class_order=lambda wildcards: EXPERIMENTS[wildcards.exp]["class_order"],
    localrule: True
    conda:
        CONDA_ENV
    log:
        "logs/split_tasks/{exp}/seed{seed}.log",
    script:
        "../../scripts/split_tasks.py"


rule reduction:
    """Down-projections R_t of task t (seq-lora: LoRA's random init; InfLoRA: designed subspace)."""
    input:
        unpack(reduction_inputs),
    output:
        "results/runs/{exp}/seed{seed}/task{t}/reduction.safetensors",
    params:
        code=code("reduction"),
        model=model_params,
        collect=collect_params,
        backbone=exp_backbone,
    threads: 1
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    log:
        "logs/reduction/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/reduction.py"


rule train_task:
    """Train the up-projections E_t and head t, every older task merged and frozen."""
    wildcard_constraints:
        exp=CIL_EXPERIMENTS,
    input:
        tasks="results/runs/{exp}/seed{seed}/tasks.json",
        backbone=exp_backbone_weights,
        train=exp_manifest("train"),
        reduction="results/runs/{exp}/seed{seed}/task{t}/reduction.safetensors",
        decoded=exp_decoded("train", "train_transform"),
        previous=previous_tasks,
    output:
        adapter="results/runs/{exp}/seed{seed}/task{t}/adapter.safetensors",
        log_csv="results/runs/{exp}/seed{seed}/task{t}/train_log.csv",
    params:
        code=code("train_task"),
        model=model_params,
        train=train_params,
        backbone=exp_backbone,
        dataset=exp_dataset,
    threads: 1
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    log:
        "logs/train_task/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/train_task.py"


rule evaluate_task:
    """Accuracy on every seen task after task t (one row of the accuracy matrix)."""
    wildcard_constraints:
        exp=CIL_EXPERIMENTS,
    input:
        tasks="results/runs/{exp}/seed{seed}/tasks.json",
        backbone=exp_backbone_weights,
        test=exp_manifest("test"),
        states=tasks_up_to_current,
        heads=aligned_heads,
        decoded=exp_decoded("test", "test_transform"),
    output:
        "results/runs/{exp}/seed{seed}/task{t}/eval.json",
    params:
        code=code("evaluate_task"),
        model=model_params,
        eval_batch_size=lambda wildcards: EXPERIMENTS[wildcards.exp]["eval_batch_size"],
        backbone=exp_backbone,
        dataset=exp_dataset,
    threads: 1
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    log:
        "logs/evaluate_task/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/evaluate_task.py"


rule memory:
    """InfLoRA: the (Dual)GPM memory after task t, from the task's inputs with its trained branch."""
    input:
        tasks="results/runs/{exp}/seed{seed}/tasks.json",
        backbone=exp_backbone_weights,
        train=exp_manifest("train"),
        states=tasks_up_to_current,
        memory=previous_memory,
        decoded=exp_decoded("train", "train_transform"),
    output:
        "results/runs/{exp}/seed{seed}/task{t}/memory.safetensors",
    params:
        code=code("memory"),
        model=model_params,
        memory=memory_params,
        collect=collect_params,
        backbone=exp_backbone,
    threads: 1
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    log:
        "logs/memory/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/memory.py"


rule class_stats:
    """InfLoRA+CA: mean and covariance of the features of task t's classes (all branches 0..t)."""
    input:
        tasks="results/runs/{exp}/seed{seed}/tasks.json",
        backbone=exp_backbone_weights,
        train=exp_manifest("train"),
        states=tasks_up_to_current,
        decoded=exp_decoded("train", "test_transform"),
    output:
        "results/runs/{exp}/seed{seed}/task{t}/class_stats.safetensors",
    params:
        code=code("class_stats"),
        model=model_params,
        covariance_eps=lambda wildcards: EXPERIMENTS[wildcards.exp]["ca"]["covariance_eps"],
        backbone=exp_backbone,
        dataset=exp_dataset,
    threads: 1
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    log:
        "logs/class_stats/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/class_stats.py"


rule align:
    """InfLoRA+CA (task t >= 1): every head re-trained on features sampled from the class Gaussians."""
    input:
        tasks="results/runs/{exp}/seed{seed}/tasks.json",
        stats=class_stats_up_to_current,
        adapters=adapters_up_to_current,
        previous=previous_aligned_heads,
    output:
        heads="results/runs/{exp}/seed{seed}/task{t}/aligned_heads.safetensors",
        log_csv="results/runs/{exp}/seed{seed}/task{t}/align_log.csv",
    params:
        code=code("align"),
        ca=lambda wildcards: EXPERIMENTS[wildcards.exp]["ca"],
    threads: 1
    conda:
        CONDA_ENV
    log:
        "logs/align/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/align.py"
