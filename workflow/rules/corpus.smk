# The corpus, split by document into train/validation/test. Two ways in:
# - whole (the default): fetch_corpus, then prepare_corpus writes each split as one Parquet file;
# - streamed (`corpus.streamed: true`, a folder of shard files such as SlimPajama's
#   *.jsonl.zst): no job reads the whole corpus. split_part reads one shard and keeps its
#   evaluation documents (each document's split is a hash of its id), prepare_corpus gathers
#   those (validation and test, a small fraction); the train split is tokenized shard by
#   shard (tokenize_part in data.smk).
wildcard_constraints:
    part=r"\d\d\d\d\d+",  # 00000, 00001, ... (no braces: they break the pattern)


if not STREAMED:

    rule fetch_corpus:
        """The files of an embedded or hf: corpus (a local folder is read in place)."""
        output:
            directory("resources/corpus/{corpus}/source"),
        log:
            "logs/fetch_corpus/{corpus}.log",
        conda:
            CONDA_ENV
        params:
            source=config["corpus"]["source"],
        script:
            "../scripts/fetch_corpus.py"

    rule prepare_corpus:
        """Clean documents, split them by document into train/validation/test Parquet files."""
        input:
            fetched=fetched_corpus,
        output:
            splits=expand("results/corpus/{{corpus}}/{split}.parquet", split=SPLITS),
            manifest="results/corpus/{corpus}/manifest.json",
        log:
            "logs/prepare_corpus/{corpus}.log",
        conda:
            CONDA_ENV
        params:
            source=config["corpus"]["source"],
            validation_fraction=config["corpus"]["validation_fraction"],
            test_fraction=config["corpus"]["test_fraction"],
            min_chars=config["corpus"]["min_chars"],
            seed=config["corpus"]["seed"],
        script:
            "../scripts/prepare_corpus.py"

else:

    rule split_part:
        """The evaluation documents (validation, test) of one corpus shard, streamed."""
        input:
            unpack(part_input),
        output:
            "results/corpus/{corpus}/parts/{part}.parquet",
        log:
            "logs/split_part/{corpus}/{part}.log",
        conda:
            CONDA_ENV
        params:
            source=config["corpus"]["source"],
            part=lambda wc: int(wc.part),
            parts=lambda wc: len(corpus_parts()),
            data_dir=config["corpus"]["data_dir"],
            name=part_name_of,
            subsets=config["corpus"]["subsets"],
            splits=EVAL_SPLITS,
            validation_fraction=config["corpus"]["validation_fraction"],
            test_fraction=config["corpus"]["test_fraction"],
            min_chars=config["corpus"]["min_chars"],
            seed=config["corpus"]["seed"],
        script:
            "../scripts/split_part.py"

    rule prepare_corpus:
        """The evaluation splits of a streamed corpus, gathered from its shards."""
        input:
            parts=lambda wc: expand(
                "results/corpus/{corpus}/parts/{part}.parquet",
                corpus=wc.corpus,
                part=corpus_parts(),
            ),
        output:
            splits=expand(
                "results/corpus/{{corpus}}/{split}.parquet", split=EVAL_SPLITS
            ),
            manifest="results/corpus/{corpus}/manifest.json",
        log:
            "logs/prepare_corpus/{corpus}.log",
        conda:
            CONDA_ENV
        params:
            splits=EVAL_SPLITS,
        script:
            "../scripts/prepare_streamed_corpus.py"
