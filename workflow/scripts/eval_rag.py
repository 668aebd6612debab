import torch

from refrag.cli import one_line_errors
from refrag.eval.rag import evaluate_rag
from refrag.io.runtime import log_to

rules = {
    snakemake.input.index: "build_index",
    snakemake.input.qa_set: "qa_set",
    snakemake.input.checkpoint: "train",
}
with log_to(snakemake.log[0]), one_line_errors(rules):
    torch.set_num_threads(snakemake.threads)
    wc, p = snakemake.wildcards, snakemake.params
    evaluate_rag(
        index=snakemake.input.index,
        qa_set=snakemake.input.qa_set,
        checkpoint=snakemake.input.checkpoint,
        out=snakemake.output[0],
        recall_n=p.recall_n,
        tokens_n=p.tokens_n,
        refrag_n=p.refrag_n,
        questions=p.questions,
        ttft_questions=p.ttft_questions,
        ttft_repeats=p.ttft_repeats,
        max_new_tokens=p.max_new_tokens,
        batch_size=p.batch_size,
        labels={
            "decoder": wc.decoder,
            "encoder": wc.encoder,
            "eval_set": wc.eval_set,
            "retriever": wc.retriever,
        },
    )
