from refrag.cli import one_line_errors
from refrag.data.shards import build_alignment_cache, read_shards
from refrag.io.runtime import log_to
from refrag.modeling.tokenization import load_tokenizer

with log_to(snakemake.log[0]), one_line_errors({snakemake.input.shards: "tokenize"}):
    pairs = build_alignment_cache(
        read_shards(snakemake.input.shards, rule="tokenize"),
        encoder_tokenizer=load_tokenizer(snakemake.input.encoder),
        decoder_tokenizer=load_tokenizer(snakemake.input.decoder),
        out=snakemake.output[0],
    )
    print(f"{pairs} aligned pairs")
