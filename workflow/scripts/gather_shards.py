from refrag.cli import one_line_errors
from refrag.data.shards import gather_shards, tokenizer_id
from refrag.io.runtime import log_to
from refrag.modeling.tokenization import load_tokenizer

with log_to(snakemake.log[0]), one_line_errors():
    p = snakemake.params
    manifest = gather_shards(
        snakemake.input.parts,
        snakemake.output[0],
        metadata={
            "split": "train",
            "context_tokens": p.context_tokens,
            "target_tokens": p.target_tokens,
            "decoder_tokenizer": tokenizer_id(load_tokenizer(snakemake.input.decoder)),
            "encoder_tokenizer": tokenizer_id(load_tokenizer(snakemake.input.encoder)),
        },
    )
    print({k: manifest[k] for k in ("rows", "documents")}, len(manifest["shards"]), "shards")
