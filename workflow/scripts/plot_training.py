from refrag.report import plot_training
from refrag.utils import log_to

with log_to(snakemake.log[0]):
    plot_training(list(zip(snakemake.params.labels, snakemake.input)), snakemake.output[0])
