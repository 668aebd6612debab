from refrag.corpus import fetch_source
from refrag.utils import log_to

with log_to(snakemake.log[0]):
    fetch_source(snakemake.params.source, snakemake.output[0])
