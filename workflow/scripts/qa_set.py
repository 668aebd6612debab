from transformers import AutoTokenizer

from refrag.cli import one_line_errors
from refrag.data.corpus import read_split
from refrag.data.qa import build_qa_set, write_qa_set
from refrag.io.runtime import log_to

with log_to(snakemake.log[0]), one_line_errors():
    documents = read_split(
        snakemake.input.corpus, snakemake.input.manifest, rule="prepare_corpus"
    ).to_dict("records")
    p = snakemake.params
    examples = build_qa_set(
        documents,
        encoder_tokenizer=AutoTokenizer.from_pretrained(snakemake.input.encoder),
        decoder_tokenizer=AutoTokenizer.from_pretrained(snakemake.input.decoder),
        context_tokens=p.context_tokens,
        target_tokens=p.target_tokens,
        max_windows=p.max_windows,
        seed=p.seed,
        per_passage=p.per_passage,
        choices=p.choices,
    )
    write_qa_set(examples, snakemake.output[0])
