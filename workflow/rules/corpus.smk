rule fetch_corpus:
    """Raw file of an embedded corpus (folders and hf: datasets are read in place)."""
    output:
        "resources/corpus/{corpus}/raw.xml.bz2",
    log:
        "logs/fetch_corpus/{corpus}.log",
    params:
        source=config["corpus"]["source"],
    script:
        "../scripts/fetch_corpus.py"


rule prepare_corpus:
    """Clean documents, split them by document into train/validation/test Parquet files."""
    input:
        raw=corpus_raw_input,
    output:
        splits=expand("results/corpus/{{corpus}}/{split}.parquet", split=SPLITS),
        manifest="results/corpus/{corpus}/manifest.json",
    log:
        "logs/prepare_corpus/{corpus}.log",
    params:
        source=config["corpus"]["source"],
        validation_fraction=config["corpus"]["validation_fraction"],
        test_fraction=config["corpus"]["test_fraction"],
        min_chars=config["corpus"]["min_chars"],
        seed=config["corpus"]["seed"],
    script:
        "../scripts/prepare_corpus.py"
