from refrag.io.runtime import log_to
from refrag.report import write_report

with log_to(snakemake.log[0]):
    write_report(
        perplexity_csv=snakemake.input.perplexity,
        ttft_csv=snakemake.input.ttft,
        qa_csv=snakemake.input.get("qa"),
        figures={
            "Log-perplexity vs compression": snakemake.input.perplexity_plot,
            "Training curves": snakemake.input.training_plot,
            "TTFT speedup": snakemake.input.ttft_plot,
        },
        dag_svg=snakemake.input.dag,
        html_out=snakemake.output.html,
        md_out=snakemake.output.md,
        config=snakemake.config,
    )
