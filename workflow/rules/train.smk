# Each stage writes an HF folder results/checkpoints/{decoder}/{encoder}/k{k}/{stage}; on GPUs
# it runs under torchrun (one process per GPU, per-rank logs), on CPU inline.


rule train_align:
    """Projector learns encoder states → decoder embeddings at aligned positions."""
    input:
        data=f"results/alignment/{CORPUS}/{{decoder}}/{{encoder}}/train.parquet",
        encoder="resources/models/{encoder}",
        decoder="resources/models/{decoder}",
    output:
        directory("results/checkpoints/{decoder}/{encoder}/k{k}/align"),
    log:
        "logs/train_align/{decoder}/{encoder}/k{k}.log",
    benchmark:
        "results/benchmarks/train_align/{decoder}/{encoder}/k{k}.tsv"
    conda:
        "../envs/refrag.yaml"
    threads: 2
    resources:
        **gpu_resources(run_gpus),
    params:
        hp=lambda wc: json.dumps(stage_hp(wc, "align")),
        launch=launcher,
        ranks="logs/train_align/{decoder}/{encoder}/k{k}",
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} -m refrag.training --stage align --k {wildcards.k} "
        "--init {input.encoder} {input.decoder} --data {input.data} --out {output} "
        "--hp {params.hp:q} --rank-log-dir {params.ranks} > {log} 2>&1"


rule train_reconstruct:
    """Paper stage 1: decoder frozen; encoder + projector reconstruct the context from its
    chunk embeddings, with a curriculum from 1 chunk up."""
    input:
        data=f"results/shards/{CORPUS}/{{decoder}}/{{encoder}}/train",
        init="results/checkpoints/{decoder}/{encoder}/k{k}/align",
    output:
        directory("results/checkpoints/{decoder}/{encoder}/k{k}/reconstruct"),
    log:
        "logs/train_reconstruct/{decoder}/{encoder}/k{k}.log",
    benchmark:
        "results/benchmarks/train_reconstruct/{decoder}/{encoder}/k{k}.tsv"
    conda:
        "../envs/refrag.yaml"
    threads: 2
    resources:
        **gpu_resources(run_gpus),
    params:
        stage="reconstruct",
        hp=lambda wc: json.dumps(stage_hp(wc, "reconstruct")),
        launch=launcher,
        ranks="logs/train_reconstruct/{decoder}/{encoder}/k{k}",
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} -m refrag.training --stage {params.stage} --k {wildcards.k} "
        "--init {input.init} --data {input.data} --out {output} "
        "--hp {params.hp:q} --rank-log-dir {params.ranks} > {log} 2>&1"


use rule train_reconstruct as train_cpt with:
    input:
        data=f"results/shards/{CORPUS}/{{decoder}}/{{encoder}}/train",
        init="results/checkpoints/{decoder}/{encoder}/k{k}/reconstruct",
    output:
        directory("results/checkpoints/{decoder}/{encoder}/k{k}/cpt"),
    log:
        "logs/train_cpt/{decoder}/{encoder}/k{k}.log",
    benchmark:
        "results/benchmarks/train_cpt/{decoder}/{encoder}/k{k}.tsv"
    params:
        stage="cpt",
        hp=lambda wc: json.dumps(stage_hp(wc, "cpt")),
        launch=launcher,
        ranks="logs/train_cpt/{decoder}/{encoder}/k{k}",
