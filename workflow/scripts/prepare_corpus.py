from pathlib import Path

from refrag.data.corpus import prepare_corpus, read_documents
from refrag.io.runtime import log_to

with log_to(snakemake.log[0]):
    manifest = prepare_corpus(
        read_documents(snakemake.params.source, snakemake.input.fetched or None),
        Path(snakemake.output.manifest).parent,
        validation_fraction=snakemake.params.validation_fraction,
        test_fraction=snakemake.params.test_fraction,
        min_chars=snakemake.params.min_chars,
        seed=snakemake.params.seed,
    )
    print(manifest)
