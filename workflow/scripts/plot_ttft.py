from refrag.report import plot_ttft
from refrag.utils import log_to

with log_to(snakemake.log[0]):
    plot_ttft(snakemake.input[0], snakemake.output[0])
