# InfLoRA's rule chain ("lora", ifcl.catalog.inflora; steps in ifcl.steps.inflora) for seq-lora, joint, inflora
# and inflora-ca: after the class-incremental protocol's split (cil.smk), for each task t:
# reduction_t -> train_t (-> memory_t) (-> class_stats_t -> align_t) -> evaluate_t.
# A task's rules take the files of tasks < t as inputs, so the DAG is explicit and a changed parameter re-runs
# exactly the tasks it affects and their dependants. Each step is built from its rule's output, input, params and
# wildcards alone (ifcl.runtime.from_rule): whatever can change a result is named here.
LORA_EXPERIMENTS = chain_experiments("cil", "lora")


rule reduction:
    """Down-projections R_t of task t (seq-lora: LoRA's random init; InfLoRA: designed subspace)."""
    wildcard_constraints:
        exp=LORA_EXPERIMENTS,
    input:
        unpack(reduction_inputs),
    output:
        out=layout.task_pattern(layout.REDUCTION),
    params:
        code=code("reduction"),
        model=model_params,
        collect=collect_params,
        backbone=exp_backbone,
        loader_workers=exp_setting("loader_workers"),
    threads: 1
    resources:
        gpu=1,
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/reduction/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/reduction.py"


rule train_task:
    """Train the up-projections E_t and head t, every older task merged and frozen."""
    wildcard_constraints:
        exp=LORA_EXPERIMENTS,
    input:
        tasks=layout.run_pattern(layout.TASKS),
        weights=exp_backbone_weights,
        manifest=exp_manifest("train"),
        reduction=layout.task_pattern(layout.REDUCTION),
        reductions=tasks_before(layout.REDUCTION),
        adapters=tasks_before(layout.ADAPTER),
        decoded=exp_decoded("train", "train_transform"),
    output:
        adapter=layout.task_pattern(layout.ADAPTER),
        log_csv=layout.task_pattern(layout.TRAIN_LOG),
    params:
        code=code("train_task"),
        model=model_params,
        train=train_params,
        backbone=exp_backbone,
        dataset=exp_dataset,
        precision=exp_setting("gpu_precision"),
        loader_workers=exp_setting("loader_workers"),
    threads: 1
    resources:
        gpu=1,
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/train_task/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/train_task.py"


rule evaluate_task:
    """Accuracy on every seen task after task t (one row of the accuracy matrix)."""
    wildcard_constraints:
        exp=LORA_EXPERIMENTS,
    input:
        tasks=layout.run_pattern(layout.TASKS),
        weights=exp_backbone_weights,
        manifest=exp_manifest("test"),
        reductions=tasks_through(layout.REDUCTION),
        adapters=tasks_through(layout.ADAPTER),
        heads=aligned_heads,
        decoded=exp_decoded("test", "test_transform"),
    output:
        out=layout.task_pattern(layout.EVAL),
    params:
        code=code("evaluate_task"),
        model=model_params,
        eval_batch_size=exp_setting("eval_batch_size"),
        backbone=exp_backbone,
        dataset=exp_dataset,
        precision=exp_setting("gpu_precision"),
        loader_workers=exp_setting("loader_workers"),
    threads: 1
    resources:
        gpu=1,
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/evaluate_task/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/evaluate_task.py"


rule memory:
    """InfLoRA: the (Dual)GPM memory after task t, from the task's inputs with its trained branch."""
    wildcard_constraints:
        exp=LORA_EXPERIMENTS,
    input:
        tasks=layout.run_pattern(layout.TASKS),
        weights=exp_backbone_weights,
        manifest=exp_manifest("train"),
        reductions=tasks_through(layout.REDUCTION),
        adapters=tasks_through(layout.ADAPTER),
        previous_memory=previous_memory,
        decoded=exp_decoded("train", "train_transform"),
    output:
        out=layout.task_pattern(layout.MEMORY),
    params:
        code=code("memory"),
        model=model_params,
        lamb=exp_setting("lamb"),
        lame=exp_setting("lame"),
        memory=exp_setting("memory"),
        num_tasks=exp_setting("num_tasks"),
        collect=collect_params,
        backbone=exp_backbone,
        loader_workers=exp_setting("loader_workers"),
    threads: 1
    resources:
        gpu=1,
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/memory/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/memory.py"


rule class_stats:
    """InfLoRA+CA: mean and covariance of the features of task t's classes (all branches 0..t)."""
    wildcard_constraints:
        exp=LORA_EXPERIMENTS,
    input:
        tasks=layout.run_pattern(layout.TASKS),
        weights=exp_backbone_weights,
        manifest=exp_manifest("train"),
        reductions=tasks_through(layout.REDUCTION),
        adapters=tasks_through(layout.ADAPTER),
        decoded=exp_decoded("train", "test_transform"),
    output:
        out=layout.task_pattern(layout.CLASS_STATS),
    params:
        code=code("class_stats"),
        model=model_params,
        covariance_eps=lambda wildcards: EXPERIMENTS[wildcards.exp]["ca"]["covariance_eps"],
        backbone=exp_backbone,
        dataset=exp_dataset,
        loader_workers=exp_setting("loader_workers"),
    threads: 1
    resources:
        gpu=1,
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/class_stats/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/class_stats.py"


rule align:
    """InfLoRA+CA (task t >= 1): every head re-trained on features sampled from the class Gaussians."""
    wildcard_constraints:
        exp=LORA_EXPERIMENTS,
    input:
        stats=tasks_through(layout.CLASS_STATS),
        adapters=tasks_through(layout.ADAPTER),
        previous=previous_aligned_heads,
    output:
        heads=layout.task_pattern(layout.ALIGNED_HEADS),
        log_csv=layout.task_pattern(layout.ALIGN_LOG),
    params:
        code=code("align"),
        ca=exp_setting("ca"),
    threads: 1
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/align/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/align.py"
