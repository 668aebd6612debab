from refrag.io.runtime import log_to
from refrag.report import write_ttft_table

with log_to(snakemake.log[0]):
    write_ttft_table(
        list(zip(snakemake.params.labels, snakemake.input)),
        json_out=snakemake.output.json,
        csv_out=snakemake.output.csv,
    )
