from transformers import AutoTokenizer

from refrag.cli import one_line_errors
from refrag.data.shards import build_alignment_cache, read_shards
from refrag.io.runtime import log_to

with log_to(snakemake.log[0]), one_line_errors({snakemake.input.shards: "tokenize"}):
    pairs = build_alignment_cache(
        read_shards(snakemake.input.shards, rule="tokenize"),
        encoder_tokenizer=AutoTokenizer.from_pretrained(snakemake.input.encoder),
        decoder_tokenizer=AutoTokenizer.from_pretrained(snakemake.input.decoder),
        out=snakemake.output[0],
    )
    print(f"{pairs} aligned pairs")
