import torch

from refrag.cli import one_line_errors
from refrag.eval.perplexity import evaluate_windows
from refrag.io.runtime import log_to

rules = {snakemake.input.shards: "tokenize"}
if snakemake.input.get("checkpoint"):
    rules[snakemake.input.checkpoint] = "train"
with log_to(snakemake.log[0]), one_line_errors(rules):
    torch.set_num_threads(snakemake.threads)
    wc = snakemake.wildcards
    variants = snakemake.params.get("variants")  # heldout_baselines scores two baselines
    evaluate_windows(
        shards=snakemake.input.shards,
        out=snakemake.output[0],
        checkpoint=snakemake.input.get("checkpoint"),
        encoder=snakemake.input.get("encoder"),
        decoder=snakemake.input.get("decoder"),
        labels={
            "decoder": wc.decoder,
            "encoder": wc.encoder,
            "eval_set": wc.get("eval_set", "validation"),  # heldout_baselines: validation
        },
        batch_size=snakemake.params.batch_size,
        **({"baselines": tuple(variants)} if variants else {}),
    )
