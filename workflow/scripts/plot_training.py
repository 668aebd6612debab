from refrag.io.runtime import log_to
from refrag.report import plot_training

with log_to(snakemake.log[0]):
    plot_training(list(zip(snakemake.params.labels, snakemake.input)), snakemake.output[0])
