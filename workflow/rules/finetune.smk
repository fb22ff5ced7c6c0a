# The MTIL full fine-tuning family's rule chain ("finetune", ifcl.catalog.zscl; steps in ifcl.steps.zscl): beside the
# MTIL protocol's frozen features (mtil.smk, for the zero-shot accuracy), per task t: train_finetune_t (from the
# weights of task t-1, the zero-shot CLIP for task 0) -> evaluate_finetune_t (every dataset of the sequence);
# iCaRL also select_memory_t (its exemplars after task t, which train_finetune_{t+1} distils on).

FINETUNE_EXPERIMENTS = chain_experiments("mtil", "finetune")
# the methods of the chain that keep an exemplar memory (iCaRL): a task file memory.safetensors
EXEMPLAR_EXPERIMENTS = experiments_where(lambda spec: method_of(spec).chain == "finetune" and
                                         layout.MEMORY in task_files(spec, 0))


rule train_finetune:
    """Fine-tune every weight of the CLIP the previous task left on dataset t."""
    input:
        unpack(finetune_train_inputs),
    output:
        out=layout.task_pattern(layout.STATE),
        log_csv=layout.task_pattern(layout.TRAIN_LOG),
    params:
        code=method_code("train_finetune"),
        model=model_params,
        method=method_settings,
        backbone=exp_backbone,
        dataset=lambda wildcards: prompt_spec(sequence_dataset(wildcards)),
        reference_template=reference_template,
        loader_workers=exp_setting("loader_workers"),
    wildcard_constraints:
        exp=FINETUNE_EXPERIMENTS,
    threads: 1
    resources:
        gpu=1,
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/train_finetune/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/train_finetune.py"


rule select_memory:
    """iCaRL: the exemplar memory after task t (the earlier datasets' shares cut, dataset t's chosen by herding on
    the features of the model after task t)."""
    input:
        weights=exp_backbone_weights,
        state=layout.task_pattern(layout.STATE),
        manifest=lambda wildcards: manifest(sequence_dataset(wildcards), "train"),
        previous=lambda wildcards: run_file(wildcards, int(wildcards.t) - 1, layout.MEMORY)
        if int(wildcards.t) > 0 else [],
    output:
        out=layout.task_pattern(layout.MEMORY),
    params:
        code=method_code("select_memory"),
        method=method_settings,
        backbone=exp_backbone,
        eval_batch_size=exp_setting("eval_batch_size"),
        loader_workers=exp_setting("loader_workers"),
    wildcard_constraints:
        exp=EXEMPLAR_EXPERIMENTS,
    threads: 1
    resources:
        gpu=1,
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/select_memory/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/select_memory.py"


rule evaluate_finetune:
    """The model after task t on every dataset of the sequence (a row of the accuracy matrix)."""
    input:
        weights=exp_backbone_weights,
        state=layout.task_pattern(layout.STATE),
        tests=lambda wildcards: [manifest(ds, "test") for ds in EXPERIMENTS[wildcards.exp]["sequence"]],
        decoded=lambda wildcards: [decoded_images(wildcards.exp, ds, "test", "clip")
                                   for ds in EXPERIMENTS[wildcards.exp]["sequence"]]
        if EXPERIMENTS[wildcards.exp]["image_cache"] != "none" else [],
    output:
        out=layout.task_pattern(layout.EVAL),
    params:
        code=method_code("evaluate_finetune"),
        eval_batch_size=exp_setting("eval_batch_size"),
        backbone=exp_backbone,
        datasets=lambda wildcards: [prompt_spec(ds) for ds in EXPERIMENTS[wildcards.exp]["sequence"]],
        loader_workers=exp_setting("loader_workers"),
    wildcard_constraints:
        exp=FINETUNE_EXPERIMENTS,
    threads: 1
    resources:
        gpu=1,
    group:
        job_group()
    conda:
        CONDA_ENV
    log:
        "logs/evaluate_finetune/{exp}/seed{seed}/task{t}.log",
    script:
        "../../scripts/evaluate_finetune.py"
