import torch

from refrag.cli import one_line_errors
from refrag.eval.qa import evaluate_qa
from refrag.io.runtime import log_to

rules = {snakemake.input.qa_set: "qa_set"}
if snakemake.input.get("checkpoint"):
    rules[snakemake.input.checkpoint] = "train"
with log_to(snakemake.log[0]), one_line_errors(rules):
    torch.set_num_threads(snakemake.threads)
    wc = snakemake.wildcards
    evaluate_qa(
        qa_set=snakemake.input.qa_set,
        out=snakemake.output[0],
        variants=snakemake.params.variants,
        fractions=snakemake.params.get("fractions", []),
        checkpoint=snakemake.input.get("checkpoint"),
        encoder=snakemake.input.get("encoder"),
        decoder=snakemake.input.get("decoder"),
        labels={"decoder": wc.decoder, "encoder": wc.encoder, "eval_set": wc.eval_set},
        max_new_tokens=snakemake.params.max_new_tokens,
        batch_size=snakemake.params.batch_size,
        sft=snakemake.params.get("sft", False),
    )
