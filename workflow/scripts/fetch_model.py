from refrag.io.models import fetch_model
from refrag.io.runtime import log_to

with log_to(snakemake.log[0]):
    fetch_model(snakemake.params.spec, snakemake.output[0])
