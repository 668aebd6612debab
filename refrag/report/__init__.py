"""The experiment report: figures (:mod:`.plots`) and the document that holds them
(:mod:`.document`). Stands on top of evaluation and training; imported only by the CLI and the
workflow's scripts."""

from refrag.report.document import write_report, write_ttft_table
from refrag.report.plots import (
    plot_perplexity,
    plot_training,
    plot_ttft,
    read_perplexity,
    stage_order,
)

__all__ = [
    "plot_perplexity",
    "plot_training",
    "plot_ttft",
    "read_perplexity",
    "stage_order",
    "write_report",
    "write_ttft_table",
]
