import torch

from refrag.cli import one_line_errors
from refrag.eval.selective import evaluate_checkpoint
from refrag.io.runtime import log_to

rules = {snakemake.input.shards: "tokenize", snakemake.input.checkpoint: "train"}
with log_to(snakemake.log[0]), one_line_errors(rules):
    torch.set_num_threads(snakemake.threads)
    wc = snakemake.wildcards
    evaluate_checkpoint(
        shards=snakemake.input.shards,
        checkpoint=snakemake.input.checkpoint,
        out=snakemake.output[0],
        fractions=snakemake.params.fractions,
        seed=snakemake.params.seed,
        labels={"decoder": wc.decoder, "encoder": wc.encoder, "eval_set": wc.eval_set},
    )
