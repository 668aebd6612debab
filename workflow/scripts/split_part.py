from refrag.cli import one_line_errors
from refrag.data.corpus import part_documents, write_split_part
from refrag.io.runtime import log_to

with log_to(snakemake.log[0]), one_line_errors():
    p = snakemake.params
    documents, origin = part_documents(
        p.source,
        part=p.part,
        parts=p.parts,
        subsets=p.subsets,
        data_dir=p.data_dir,
        shard=snakemake.input.get("shard"),
        name=p.name,
    )
    print(origin)
    kept = write_split_part(
        documents,
        snakemake.output[0],
        splits=p.splits,
        validation_fraction=p.validation_fraction,
        test_fraction=p.test_fraction,
        min_chars=p.min_chars,
        seed=p.seed,
    )
    print({"part": p.part, "evaluation_documents": kept})
