from refrag.io.runtime import log_to
from refrag.report import plot_perplexity

with log_to(snakemake.log[0]):
    plot_perplexity(snakemake.input[0], snakemake.output[0])
