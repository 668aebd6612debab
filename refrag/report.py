"""The experiment report: perplexity table and plot, training curves, TTFT, the workflow DAG.

Each plot is its own function from input files to one PNG (:func:`plot_perplexity`,
:func:`plot_training`, :func:`plot_ttft`); :func:`write_ttft_table` merges TTFT benchmarks;
:func:`write_report` assembles given tables and figures into a self-contained ``report.html``
(figures inlined) and a ``report.md`` that links them. Every function takes the paths it reads
and writes: nothing here knows where a workflow keeps its files.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from refrag.train.stages import STAGES  # noqa: E402

PathLike = str | os.PathLike

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img,svg{max-width:100%;height:auto}
.note{color:#555;font-size:14px}
"""


TTFT_COLUMNS = [
    "decoder",
    "encoder",
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


BASELINE_STYLES = {  # variant: (line style, colour)
    "no_context": ("--", "tab:red"),
    "full_context": (":", "tab:green"),
    "full_context_lowercase": ("-.", "tab:purple"),
}


def _yerr(rows: pd.DataFrame, value: str, lo: str, hi: str):
    """Error-bar lengths below and above ``value`` from interval columns, where present."""
    if lo not in rows.columns or rows[[lo, hi]].isna().all().all():
        return None
    return [(rows[value] - rows[lo]).clip(lower=0), (rows[hi] - rows[value]).clip(lower=0)]


def plot_perplexity(perplexity_csv: PathLike, out: PathLike) -> Path:
    """Per eval set, two panels against k: log-ppl and the context benefit retained, one line
    per REFRAG stage and model pair with 95% error bars; baselines as horizontal lines with
    their interval as a band."""
    table = read_perplexity(perplexity_csv)
    sets = table["eval_set"].nunique()
    fig, axes = plt.subplots(sets, 2, figsize=(12, 4.2 * sets), squeeze=False)
    panels = (
        ("log_ppl", "log_ppl_lo", "log_ppl_hi", "log-perplexity of the continuation (nats/token)"),
        (
            "context_benefit_retained",
            "retained_lo",
            "retained_hi",
            "context benefit retained",
        ),
    )
    for row_axes, (eval_set, part) in zip(axes, table.groupby("eval_set")):
        refrag = part[part["k"].notna()]
        refrag = refrag if "p" in refrag else refrag.assign(p=float("nan"))
        for ax, (value, lo, hi, ylabel) in zip(row_axes, panels):
            if value not in part.columns:
                ax.set_visible(False)
                continue
            for (variant, fraction, decoder, encoder), rows in refrag.groupby(
                ["variant", "p", "decoder", "encoder"], dropna=False
            ):
                selective = "" if pd.isna(fraction) else f", p={fraction:g}"
                rows = rows.sort_values("k")
                ax.errorbar(
                    rows["k"].astype(int),
                    rows[value],
                    yerr=_yerr(rows, value, lo, hi),
                    marker="o",
                    capsize=4,
                    label=f"{variant}{selective} ({decoder} / {encoder})",
                )
            for variant, (style, colour) in BASELINE_STYLES.items():
                for _, row in part[part["variant"] == variant].iterrows():
                    ax.axhline(
                        row[value],
                        linestyle=style,
                        color=colour,
                        label=f"{variant} ({row['decoder']})",
                    )
                    if lo in part.columns and pd.notna(row[lo]) and row[hi] > row[lo]:
                        ax.axhspan(row[lo], row[hi], color=colour, alpha=0.1)
            ks = sorted(refrag["k"].dropna().astype(int).unique())
            if ks:
                ax.set_xscale("log", base=2)
                ax.set_xticks(ks, [str(k) for k in ks])
                ax.minorticks_off()
            ax.set_xlabel("compression k (encoder tokens per chunk embedding)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"eval set: {eval_set}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def stage_order(names: set[str]) -> list[str]:
    """``names`` in the stage registry's order; stages it does not know last, sorted."""
    return [s for s in STAGES if s in names] + sorted(names - set(STAGES))


def plot_training(checkpoints: Sequence[tuple[str, PathLike]], out: PathLike) -> Path:
    """Training loss per step, one panel per stage (in :data:`refrag.train.stages.STAGES` order), one
    line per run: ``checkpoints`` are (run label, stage folder holding training_log.json). A
    stage that logged a ``reward`` (the policy stage) shows its mean reward instead.
    Stages that logged a held-out curve (:mod:`refrag.train.heldout`) get a second panel below: the
    share of the context's benefit retained on validation windows against training tokens."""
    logs = [
        (label, json.loads((Path(folder) / "training_log.json").read_text()))
        for label, folder in checkpoints
    ]
    stages = stage_order({log["stage"] for _, log in logs})
    curves = {
        log["stage"] for _, log in logs if any("heldout_retained" in e for e in log["log_history"])
    }
    rewarded = {  # policy stages: their REINFORCE loss centres on 0; the reward is the curve
        log["stage"] for _, log in logs if any("reward" in e for e in log["log_history"])
    }
    rows = 2 if curves else 1
    fig, axes = plt.subplots(
        rows, len(stages), figsize=(5 * len(stages), 3.5 * rows), squeeze=False
    )
    for col, stage in enumerate(stages):
        ax = axes[0][col]
        for run, log in logs:
            if log["stage"] != stage:
                continue
            metric = "reward" if stage in rewarded else "loss"
            points = [(e["step"], e[metric]) for e in log["log_history"] if metric in e]
            if points:
                ax.plot(*zip(*points), label=run)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel(
            "mean reward (−log-ppl of the continuation)" if stage in rewarded else "training loss"
        )
        ax.legend(fontsize=7)
        if stage in curves:
            _plot_heldout(axes[1][col], stage, logs)
        elif rows == 2:
            axes[1][col].axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def _plot_heldout(ax, stage: str, logs: list[tuple[str, dict]]) -> None:
    for run, log in logs:
        points = [e for e in log["log_history"] if "heldout_retained" in e]
        if log["stage"] == stage and points:
            ax.plot(
                [p["heldout_tokens_seen"] for p in points],
                [p["heldout_retained"] for p in points],
                marker="o",
                label=run,
            )
    windows = next(
        e["heldout_windows"]
        for _, log in logs
        for e in log["log_history"]
        if "heldout_windows" in e
    )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_title(f"{stage}: held-out curve ({windows} validation windows)")
    ax.set_xlabel("training tokens (context + target)")
    ax.set_ylabel("context benefit retained")
    ax.legend(fontsize=7)


def write_ttft_table(
    benchmarks: Sequence[tuple[Mapping[str, str], PathLike]], json_out: PathLike, csv_out: PathLike
) -> pd.DataFrame:
    """Merge TTFT benchmark files (JSON row lists), each with its labels (e.g. decoder and
    encoder names) set on its rows, into one JSON row list and one CSV table."""
    rows = [
        row | dict(labels)
        for labels, path in benchmarks
        for row in json.loads(Path(path).read_text())
    ]
    Path(json_out).write_text(json.dumps(rows, indent=2) + "\n")
    frame = pd.DataFrame(rows)
    frame = frame[[c for c in TTFT_COLUMNS if c in frame.columns]]
    frame.to_csv(csv_out, index=False)
    return frame


def plot_ttft(ttft_json: PathLike, out: PathLike) -> Path:
    """TTFT speedup over the plain decoder vs context length, per model pair and k."""
    frame = pd.DataFrame(json.loads(Path(ttft_json).read_text()))
    keys = [c for c in ("decoder", "encoder") if c in frame.columns] + ["k"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, part in frame.groupby(keys):
        *pair, k = key
        name = " / ".join([*pair, f"k={k}"])
        part = part.sort_values("context")
        ax.plot(part["context"], part["speedup_cached"], marker="o", label=f"{name}, cached")
        ax.plot(
            part["context"],
            part["speedup_recomputed"],
            marker="x",
            linestyle="--",
            label=f"{name}, recomputed",
        )
    ax.set_xlabel("context length s (tokens)")
    ax.set_ylabel("TTFT speedup vs full context (×)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def read_perplexity(perplexity_csv: PathLike) -> pd.DataFrame:
    table = pd.read_csv(perplexity_csv)
    table["k"] = table["k"].astype("Int64")
    return table


def write_report(
    *,
    perplexity_csv: PathLike,
    ttft_csv: PathLike | None,
    figures: Mapping[str, PathLike],
    qa_csv: PathLike | None = None,
    dag_svg: PathLike | None,
    html_out: PathLike,
    md_out: PathLike,
    config: dict | None = None,
) -> None:
    """Assemble the tables (perplexity, QA when ``qa_csv`` is given, TTFT), ``figures``
    (title → PNG) and DAG into ``html_out`` (inlined) and ``md_out`` (linking the files where
    they are)."""
    html_out, md_out = Path(html_out), Path(md_out)
    table = read_perplexity(perplexity_csv)
    ttft = pd.read_csv(ttft_csv) if ttft_csv and Path(ttft_csv).exists() else None

    shown = _shown(table)
    ttft_table = ttft.round(2) if ttft is not None and len(ttft) else None
    qa = _shown(pd.read_csv(qa_csv).astype({"k": "Int64"})) if qa_csv else None
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
    if qa is not None:
        md += ["## Question answering", "", QA_CAPTION, "", qa.to_markdown(index=False), ""]
    if ttft_table is not None:
        md += ["## Time to first token", "", ttft_table.to_markdown(index=False), ""]
    md += [f"![{title}]({os.path.relpath(fig, md_out.parent)})" for title, fig in figures.items()]
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
    if qa is not None:
        body += [
            f"<h2>Question answering</h2><p class='note'>{html.escape(QA_CAPTION)}</p>",
            _scroll(qa.to_html(index=False)),
        ]
    if ttft_table is not None:
        body += ["<h2>Time to first token</h2>", _scroll(ttft_table.to_html(index=False))]
    for title, fig in figures.items():
        data = base64.b64encode(Path(fig).read_bytes()).decode()
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


QA_CAPTION = (
    "Cloze questions on held-out passages (a sentence of the passage with a name or number "
    "blanked; the answer is in the passage), answered greedily; exact_match and f1 as in SQuAD "
    "v1.1. no_context: the question alone; full_context: the passage as tokens; refrag: the "
    "passage as chunk embeddings (k encoder tokens each). sft False: the base decoder "
    "(baselines) or the cpt checkpoint (refrag); sft True: the sft checkpoint. [*_lo, *_hi]: "
    "95% bootstrap interval over documents; every row answers the same questions (checked)."
)


def _shown(table: pd.DataFrame) -> pd.DataFrame:
    """A table as the report prints it: 4 decimals, blanks for missing values."""
    return table.round(4).astype(object).where(table.notna(), "")


def _scroll(table_html: str) -> str:
    return f"<div style='overflow-x:auto'>{table_html}</div>"


def _caption() -> str:
    return (
        "log_ppl: mean negative log-likelihood (nats) per target token of held-out continuations "
        "(o tokens after s context tokens); lower is better. no_context: the decoder sees no context; "
        "full_context: the context as tokens; full_context_lowercase: the context's text lowercased "
        "and re-tokenized (at best what an uncased encoder can pass on); refrag: the context as chunk "
        "embeddings (k encoder tokens each); refrag_<stage>: an earlier stage; refrag_rl, "
        "refrag_random, refrag_heuristic: a fraction p of the chunks read as tokens, chosen by "
        "the learned policy, at random, or by the decoder's surprise at their tokens (the "
        "policy stage's model). "
        "context_benefit_retained = (no_context − variant) / (no_context − full_context). "
        "[*_lo, *_hi]: 95% bootstrap interval over documents (all variants of an eval set resampled "
        "together). positions: decoder positions the context took, per window on average (BOS, "
        "shared by all variants, not counted); compression = context tokens (s) / positions. "
        "n_tokens: target tokens scored, the same tokens in every row of an eval set (checked)."
    )
