from refrag.data.corpus import stream_documents, write_split_part
from refrag.io.runtime import log_to

with log_to(snakemake.log[0]):
    p = snakemake.params
    kept = write_split_part(
        stream_documents(snakemake.input.shard, p.subsets, name=p.name),
        snakemake.output[0],
        splits=p.splits,
        validation_fraction=p.validation_fraction,
        test_fraction=p.test_fraction,
        min_chars=p.min_chars,
        seed=p.seed,
    )
    print({"shard": p.name, "evaluation_documents": kept})
