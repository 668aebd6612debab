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
