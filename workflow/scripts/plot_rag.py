from refrag.eval.rag import plot_rag
from refrag.io.runtime import log_to

with log_to(snakemake.log[0]):
    plot_rag(snakemake.input[0], snakemake.output[0])
