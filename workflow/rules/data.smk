rule tokenize:
    """(context, target) windows of one split, in both tokenizations: Parquet shards + manifest."""
    input:
        corpus="results/corpus/{corpus}/{split}.parquet",
        manifest="results/corpus/{corpus}/manifest.json",
        decoder="resources/models/{decoder}",
        encoder="resources/models/{encoder}",
    output:
        directory("results/shards/{corpus}/{decoder}/{encoder}/{split}"),
    log:
        "logs/tokenize/{corpus}/{decoder}/{encoder}/{split}.log",
    conda:
        CONDA_ENV
    params:
        context_tokens=config["data"]["context_tokens"],
        target_tokens=config["data"]["target_tokens"],
        max_windows=lambda wc: config["data"]["max_windows"][wc.split],
    script:
        "../scripts/tokenize.py"


rule align_pairs:
    """Alignment-pair cache of the training contexts for one (decoder, encoder) tokenizer pair."""
    input:
        shards="results/shards/{corpus}/{decoder}/{encoder}/train",
        decoder="resources/models/{decoder}",
        encoder="resources/models/{encoder}",
    output:
        "results/alignment/{corpus}/{decoder}/{encoder}/train.parquet",
    log:
        "logs/align_pairs/{corpus}/{decoder}/{encoder}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/align_pairs.py"
