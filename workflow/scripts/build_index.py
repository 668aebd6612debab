import torch

from refrag.cli import one_line_errors
from refrag.data.corpus import read_split
from refrag.io.runtime import log_to
from refrag.retrieval import PassageIndex, chunk_documents

with log_to(snakemake.log[0]), one_line_errors():
    torch.set_num_threads(snakemake.threads)
    p = snakemake.params
    documents = [
        doc
        for split in snakemake.input.splits
        for doc in read_split(split, snakemake.input.manifest, rule="prepare_corpus").to_dict(
            "records"
        )
    ]
    passages = chunk_documents(documents, words=p.passage_words, overlap=p.overlap)
    print(
        f"{len(passages)} passages of at most {p.passage_words} words from {len(documents)} documents"
    )
    index = PassageIndex.build(passages, snakemake.input.encoder, batch_size=p.batch_size)
    index.save(snakemake.output[0])
    print(index.meta)
