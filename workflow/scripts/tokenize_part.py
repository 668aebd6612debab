from refrag.cli import one_line_errors
from refrag.data.corpus import part_documents
from refrag.data.shards import tokenize_stream
from refrag.io.runtime import log_to
from refrag.modeling.tokenization import load_tokenizer

with log_to(snakemake.log[0]), one_line_errors():
    encoder = load_tokenizer(snakemake.input.encoder)
    decoder = load_tokenizer(snakemake.input.decoder)
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
    manifest = tokenize_stream(
        documents,
        snakemake.output[0],
        split="train",
        validation_fraction=p.validation_fraction,
        test_fraction=p.test_fraction,
        seed=p.seed,
        min_chars=p.min_chars,
        max_windows=p.max_windows,
        metadata={"split": "train", "part": p.part, "read": origin},
        encoder_tokenizer=encoder,
        decoder_tokenizer=decoder,
        context_tokens=p.context_tokens,
        target_tokens=p.target_tokens,
    )
    print({k: manifest[k] for k in ("rows", "documents")}, origin)
