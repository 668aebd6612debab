from refrag.eval.rag import report_sections
from refrag.io.runtime import log_to
from refrag.report import write_report

with log_to(snakemake.log[0]):
    rag = snakemake.input.get("rag")
    write_report(
        perplexity_csv=snakemake.input.perplexity,
        ttft_csv=snakemake.input.ttft,
        qa_csv=snakemake.input.get("qa"),
        figures={
            "Log-perplexity vs compression": snakemake.input.perplexity_plot,
            "Training curves": snakemake.input.training_plot,
            "TTFT speedup": snakemake.input.ttft_plot,
        }
        | ({"RAG: accuracy against passages and TTFT": snakemake.input.rag_plot} if rag else {}),
        dag_svg=snakemake.input.dag,
        html_out=snakemake.output.html,
        md_out=snakemake.output.md,
        config=snakemake.config,
        sections=report_sections(rag, snakemake.input.retrieval, snakemake.input.rag_equal)
        if rag
        else (),
    )
