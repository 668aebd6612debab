from refrag.report import write_report
from refrag.utils import log_to

with log_to(snakemake.log[0]):
    write_report(
        perplexity_csv=snakemake.input.perplexity,
        checkpoints=snakemake.input.checkpoints,
        ttft_json=snakemake.input.ttft,
        dag_svg=snakemake.input.dag,
        html_out=snakemake.output.html,
        md_out=snakemake.output.md,
        config=snakemake.config,
    )
