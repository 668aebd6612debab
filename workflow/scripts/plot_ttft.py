from refrag.io.runtime import log_to
from refrag.report import plot_ttft

with log_to(snakemake.log[0]):
    plot_ttft(snakemake.input[0], snakemake.output[0])
