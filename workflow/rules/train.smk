# One rule trains every stage of refrag.train.stages.STAGES: the registry says what a stage reads
# and which stage's checkpoint it starts from (train_inputs in stages.smk). Each job writes an
# HF folder results/checkpoints/{corpus}/{decoder}/{encoder}/k{k}/{stage}; the run's `parallel`
# block says how: inline on CPU or one GPU, torchrun (one process per GPU, per-rank logs) on
# one node or N nodes, DDP or FSDP2 (refrag.train.launch, refrag.train.sharding).


rule train:
    """One training stage of one run (python -m refrag.cli train --stage {stage})."""
    input:
        unpack(train_inputs),
    output:
        directory("results/checkpoints/{corpus}/{decoder}/{encoder}/k{k}/{stage}"),
    log:
        "logs/train/{corpus}/{decoder}/{encoder}/k{k}/{stage}.log",
    benchmark:
        "results/benchmarks/train/{corpus}/{decoder}/{encoder}/k{k}/{stage}.tsv"
    priority: 5  # training is the critical path: before evaluations that could wait
    conda:
        CONDA_ENV
    threads: train_threads
    resources:
        **gpu_resources(run_gpus, nodes=run_nodes, submitter=run_submits_batch_job),
    params:
        hp=lambda wc: json.dumps(stage_hp(wc)),
        start=train_start,
        rebuilt_by=train_rebuilt_by,
        launch=launcher,
        parallel=parallel_param,
        ranks="logs/train/{corpus}/{decoder}/{encoder}/k{k}/{stage}",
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} -m refrag.cli train --stage {wildcards.stage} "
        "--k {wildcards.k} {params.start} --data {input.data} --out {output} "
        "--hp {params.hp:q} --parallel {params.parallel:q} --rebuilt-by {params.rebuilt_by} --rank-log-dir {params.ranks} > {log} 2>&1"
