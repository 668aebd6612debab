from refrag.cli import one_line_errors
from refrag.data.corpus import stream_documents
from refrag.data.shards import tokenize_stream
from refrag.io.runtime import log_to
from refrag.modeling.tokenization import load_tokenizer

with log_to(snakemake.log[0]), one_line_errors():
    encoder = load_tokenizer(snakemake.input.encoder)
    decoder = load_tokenizer(snakemake.input.decoder)
    p = snakemake.params
    manifest = tokenize_stream(
        stream_documents(snakemake.input.shard, p.subsets, name=p.name),
        snakemake.output[0],
        split="train",
        validation_fraction=p.validation_fraction,
        test_fraction=p.test_fraction,
        seed=p.seed,
        min_chars=p.min_chars,
        max_windows=p.max_windows,
        metadata={"split": "train", "part": p.name},
        encoder_tokenizer=encoder,
        decoder_tokenizer=decoder,
        context_tokens=p.context_tokens,
        target_tokens=p.target_tokens,
    )
    print({k: manifest[k] for k in ("rows", "documents")})
