"""The experiment report: perplexity table and plot, training curves, TTFT, the workflow DAG.

Writes a self-contained ``report.html`` (figures inlined) and a ``report.md`` summary whose
figures are PNG files beside it.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img,svg{max-width:100%;height:auto}
.note{color:#555;font-size:14px}
"""


TTFT_COLUMNS = [
    "context",
    "k",
    "baseline_ms",
    "baseline_attn",
    "baseline_graph",
    "cache_lookup_ms",
    "refrag_cached_ms",
    "refrag_recomputed_ms",
    "speedup_cached",
    "speedup_recomputed",
    "analytic_limit",
    "baseline_ttit_ms",
    "refrag_ttit_ms",
]


def plot_perplexity(table: pd.DataFrame, out: Path) -> Path:
    """log-ppl vs k for REFRAG (one line per stage), baselines as horizontal lines."""
    fig, axes = plt.subplots(
        1, table["eval_set"].nunique(), figsize=(6 * table["eval_set"].nunique(), 4), squeeze=False
    )
    for ax, (eval_set, part) in zip(axes[0], table.groupby("eval_set")):
        for (variant, decoder, encoder), rows in part[part["k"].notna()].groupby(
            ["variant", "decoder", "encoder"]
        ):
            rows = rows.sort_values("k")
            ax.plot(
                rows["k"].astype(int),
                rows["log_ppl"],
                marker="o",
                label=f"{variant} ({decoder} / {encoder})",
            )
        for variant, style in (("no_context", "--"), ("full_context", ":")):
            for _, row in part[part["variant"] == variant].iterrows():
                ax.axhline(
                    row["log_ppl"],
                    linestyle=style,
                    color="gray",
                    label=f"{variant} ({row['decoder']})",
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression k (tokens per chunk embedding)")
        ax.set_ylabel("log-perplexity of the continuation (nats/token)")
        ax.set_title(f"eval set: {eval_set}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_training(logs: list[tuple[str, dict]], out: Path) -> Path:
    """Training loss per step, one panel per stage, one line per run."""
    stages = sorted({log["stage"] for _, log in logs}, key=["align", "reconstruct", "cpt"].index)
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for run, log in logs:
            if log["stage"] != stage:
                continue
            points = [(e["step"], e["loss"]) for e in log["log_history"] if "loss" in e]
            if points:
                ax.plot(*zip(*points), label=run)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_ttft(rows: list[dict], out: Path) -> Path:
    """TTFT speedup over the plain decoder vs context length, per k."""
    frame = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, part in frame.groupby("k"):
        part = part.sort_values("context")
        ax.plot(part["context"], part["speedup_cached"], marker="o", label=f"k={k}, cached")
        ax.plot(
            part["context"],
            part["speedup_recomputed"],
            marker="x",
            linestyle="--",
            label=f"k={k}, recomputed",
        )
    ax.set_xlabel("context length s (tokens)")
    ax.set_ylabel("TTFT speedup vs full context (×)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(
    *,
    perplexity_csv: str | os.PathLike,
    checkpoints: list[str],
    ttft_json: str | os.PathLike | None,
    dag_svg: str | os.PathLike | None,
    html_out: str | os.PathLike,
    md_out: str | os.PathLike,
    config: dict | None = None,
) -> None:
    html_out, md_out = Path(html_out), Path(md_out)
    fig_dir = md_out.with_suffix("")
    fig_dir.mkdir(parents=True, exist_ok=True)
    table = pd.read_csv(perplexity_csv)
    table["k"] = table["k"].astype("Int64")
    logs = []  # (run, log): a checkpoint folder is .../{decoder}/{encoder}/k{k}/{stage}
    for ckpt in checkpoints:
        path = Path(ckpt) / "training_log.json"
        if path.exists():
            logs.append((" / ".join(Path(ckpt).parts[-4:-1]), json.loads(path.read_text())))
    figures = {"Log-perplexity vs compression": plot_perplexity(table, fig_dir / "perplexity.png")}
    if logs:
        figures["Training curves"] = plot_training(logs, fig_dir / "training.png")
    ttft = (
        json.loads(Path(ttft_json).read_text()) if ttft_json and Path(ttft_json).exists() else None
    )
    if ttft:
        figures["TTFT speedup"] = plot_ttft(ttft, fig_dir / "ttft.png")

    shown = table.round(4).astype(object).where(table.notna(), "")
    ttft_table = pd.DataFrame(ttft).reindex(columns=TTFT_COLUMNS).round(2) if ttft else None
    md = [
        "# REFRAG experiment report",
        "",
        "## Perplexity",
        "",
        _caption(),
        "",
        shown.to_markdown(index=False),
        "",
    ]
    if ttft_table is not None:
        md += ["## Time to first token", "", ttft_table.to_markdown(index=False), ""]
    md += [f"![{title}]({fig_dir.name}/{fig.name})" for title, fig in figures.items()]
    if dag_svg:
        md += [
            "",
            f"Workflow DAG: [{Path(dag_svg).name}]({os.path.relpath(dag_svg, md_out.parent)})",
        ]
    md_out.write_text("\n".join(md) + "\n")

    body = [
        f"<h1>REFRAG experiment report</h1><h2>Perplexity</h2><p class='note'>{html.escape(_caption())}</p>",
        _scroll(shown.to_html(index=False)),
    ]
    if ttft_table is not None:
        body += ["<h2>Time to first token</h2>", _scroll(ttft_table.to_html(index=False))]
    for title, fig in figures.items():
        data = base64.b64encode(fig.read_bytes()).decode()
        body.append(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        )
    if dag_svg and Path(dag_svg).exists():
        body += ["<h2>Workflow</h2>", Path(dag_svg).read_text()]
    if config:
        body += [
            "<h2>Configuration</h2><pre>",
            html.escape(json.dumps(config, indent=2, default=str)),
            "</pre>",
        ]
    html_out.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>REFRAG report</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _scroll(table_html: str) -> str:
    return f"<div style='overflow-x:auto'>{table_html}</div>"


def _caption() -> str:
    return (
        "log_ppl: mean negative log-likelihood (nats) per target token of held-out continuations "
        "(o tokens after s context tokens); lower is better. no_context: the decoder sees no context; "
        "full_context: the context as tokens; refrag: the context as chunk embeddings (k tokens each). "
        "context_benefit_retained = (no_context − refrag) / (no_context − full_context)."
    )
