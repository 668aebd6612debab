from refrag.data.corpus import fetch_source
from refrag.io.runtime import log_to

with log_to(snakemake.log[0]):
    fetch_source(snakemake.params.source, snakemake.output[0])
