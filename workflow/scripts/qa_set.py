from refrag.cli import one_line_errors
from refrag.data.qa import build_qa, write_qa_set
from refrag.data.shards import read_shards
from refrag.io.runtime import log_to

with log_to(snakemake.log[0]), one_line_errors({snakemake.input[0]: "tokenize"}):
    windows = read_shards(snakemake.input[0]).to_dict("records")
    examples = build_qa(
        windows, seed=snakemake.params.seed, per_passage=snakemake.params.per_passage
    )
    write_qa_set(examples, snakemake.output[0])
    documents = {e.passage_id.rsplit("#", 1)[0] for e in examples}
    print(f"{len(examples)} questions from {len(windows)} windows of {len(documents)} documents")
