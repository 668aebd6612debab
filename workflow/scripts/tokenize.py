from pathlib import Path

from refrag.cli import one_line_errors
from refrag.data.corpus import read_split
from refrag.data.shards import iter_windows, spread, tokenizer_id, write_shards
from refrag.io.runtime import log_to
from refrag.modeling.tokenization import load_tokenizer

with log_to(snakemake.log[0]), one_line_errors():
    encoder = load_tokenizer(snakemake.input.encoder)
    decoder = load_tokenizer(snakemake.input.decoder)
    documents = read_split(
        snakemake.input.corpus, snakemake.input.manifest, rule="prepare_corpus"
    ).to_dict("records")
    p = snakemake.params
    windows = spread(
        list(
            iter_windows(
                documents,
                encoder_tokenizer=encoder,
                decoder_tokenizer=decoder,
                context_tokens=p.context_tokens,
                target_tokens=p.target_tokens,
            )
        ),
        p.max_windows,
    )
    manifest = write_shards(
        windows,
        Path(snakemake.output[0]),
        metadata={
            "split": snakemake.wildcards.split,
            "context_tokens": p.context_tokens,
            "target_tokens": p.target_tokens,
            "decoder_tokenizer": tokenizer_id(decoder),
            "encoder_tokenizer": tokenizer_id(encoder),
        },
    )
    print({k: manifest[k] for k in ("rows", "documents")})
