import math


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
    wildcard_constraints:
        split="|".join(EVAL_SPLITS if STREAMED else SPLITS),  # streamed: train by shard
    priority: 10  # the training chain starts here
    conda:
        CONDA_ENV
    params:
        context_tokens=config["data"]["context_tokens"],
        target_tokens=config["data"]["target_tokens"],
        max_windows=lambda wc: config["data"]["max_windows"][wc.split],
    script:
        "../scripts/tokenize.py"


if STREAMED:

    rule tokenize_part:
        """Train windows of one corpus shard, read streamed and written as they come (the
        split's max_windows shared evenly by the shards: the first ones of each)."""
        input:
            unpack(part_input),
            decoder="resources/models/{decoder}",
            encoder="resources/models/{encoder}",
        output:
            directory("results/shards/{corpus}/{decoder}/{encoder}/train.parts/{part}"),
        log:
            "logs/tokenize_part/{corpus}/{decoder}/{encoder}/{part}.log",
        conda:
            CONDA_ENV
        params:
            source=config["corpus"]["source"],
            part=lambda wc: int(wc.part),
            parts=lambda wc: len(corpus_parts()),
            data_dir=config["corpus"]["data_dir"],
            name=part_name_of,
            subsets=config["corpus"]["subsets"],
            validation_fraction=config["corpus"]["validation_fraction"],
            test_fraction=config["corpus"]["test_fraction"],
            min_chars=config["corpus"]["min_chars"],
            seed=config["corpus"]["seed"],
            context_tokens=config["data"]["context_tokens"],
            target_tokens=config["data"]["target_tokens"],
            max_windows=lambda wc: math.ceil(
                config["data"]["max_windows"]["train"] / len(corpus_parts())
            ),
        script:
            "../scripts/tokenize_part.py"

    rule gather_train_shards:
        """The train split's shard folder: every part's shards, linked, one manifest."""
        input:
            parts=lambda wc: expand(
                "results/shards/{corpus}/{decoder}/{encoder}/train.parts/{part}",
                part=corpus_parts(),
                **wc,
            ),
            decoder="resources/models/{decoder}",
            encoder="resources/models/{encoder}",
        output:
            directory("results/shards/{corpus}/{decoder}/{encoder}/train"),
        log:
            "logs/gather_train_shards/{corpus}/{decoder}/{encoder}.log",
        conda:
            CONDA_ENV
        params:
            context_tokens=config["data"]["context_tokens"],
            target_tokens=config["data"]["target_tokens"],
        script:
            "../scripts/gather_shards.py"


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
    priority: 10  # every align job waits on it
    conda:
        CONDA_ENV
    script:
        "../scripts/align_pairs.py"
