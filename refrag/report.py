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
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from refrag.eval.tables import compact, with_interval  # noqa: E402
from refrag.train.stages import STAGES  # noqa: E402

PathLike = str | os.PathLike

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img,svg{max-width:100%;height:auto}
.note{color:#555;font-size:14px}.headline li{margin:.4em 0;font-size:16px}
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
    "baseline_spread",
    "cached_spread",
    "recomputed_spread",
    "noise",
    "baseline_ttit_ms",
    "refrag_ttit_ms",
]


BASELINE_STYLES = {  # variant: (line style, colour)
    "no_context": ("--", "tab:red"),
    "full_context": (":", "tab:green"),
    "full_context_encoder_text": ("-.", "tab:purple"),
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


PANEL_SIZE = (6.0, 4.0)  # inches of one training panel (at 110 dpi: 660 x 440 pixels)


TRAINING_COLUMNS = 2  # panels per row of the training plot


def stage_order(names: set[str]) -> list[str]:
    """``names`` in the stage registry's order; stages it does not know last, sorted."""
    return [s for s in STAGES if s in names] + sorted(names - set(STAGES))


def plot_training(checkpoints: Sequence[tuple[str, PathLike]], out: PathLike) -> Path:
    """Training loss per step, one panel per stage (in :data:`refrag.train.stages.STAGES` order), one
    line per run: ``checkpoints`` are (run label, stage folder holding training_log.json). A
    stage that logged a ``reward`` (the policy stage) shows its mean reward instead.
    Stages that logged a held-out curve (:mod:`refrag.train.heldout`) get a second panel right
    after theirs: the share of the context's benefit retained on validation windows against
    training tokens. Panels are laid out two per row, each large enough to read at the
    report's width (:data:`PANEL_SIZE` inches)."""
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
    panels = [(stage, heldout) for stage in stages for heldout in (False, True)]
    panels = [(stage, heldout) for stage, heldout in panels if not heldout or stage in curves]
    cols = min(TRAINING_COLUMNS, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows), squeeze=False
    )
    flat = axes.ravel()
    for ax in flat[len(panels) :]:
        ax.axis("off")
    for ax, (stage, heldout) in zip(flat, panels):
        if heldout:
            _plot_heldout(ax, stage, logs)
            continue
        for run, log in logs:
            if log["stage"] != stage:
                continue
            metric = "reward" if stage in rewarded else "loss"
            points = [(e["step"], e[metric]) for e in log["log_history"] if metric in e]
            if points:
                ax.plot(*zip(*points), label=run)
        ax.set_title(f"{stage}: training", fontsize=12)
        ax.set_xlabel("step")
        ax.set_ylabel(
            "mean reward (−log-ppl of the continuation)" if stage in rewarded else "training loss"
        )
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
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
    ax.grid(alpha=0.3)
    ax.set_title(f"{stage}: held-out curve ({windows} validation windows)", fontsize=12)
    ax.set_xlabel("training tokens (context + target)")
    ax.set_ylabel("context benefit retained")
    ax.legend(fontsize=9)


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
    """TTFT speedup over the plain decoder vs context length, per model pair and k, with the
    analytic limit (dotted); a noisy row's points are hollow, a suspect ratio is not drawn."""
    frame = pd.DataFrame(json.loads(Path(ttft_json).read_text()))
    keys = [c for c in ("decoder", "encoder") if c in frame.columns] + ["k"]
    if "noise" not in frame:
        frame["noise"] = [[] for _ in range(len(frame))]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, (key, part) in enumerate(frame.groupby(keys)):
        *pair, k = key
        name, color = " / ".join([*pair, f"k={k}"]), f"C{i}"
        part = part.sort_values("context")
        noisy = part["noise"].map(bool)
        for mode, marker, style in (("cached", "o", "-"), ("recomputed", "s", "--")):
            y = pd.to_numeric(part[f"speedup_{mode}"], errors="coerce")
            ax.plot(part["context"], y, style, color=color, label=f"{name}, {mode}")
            ax.scatter(part["context"][~noisy], y[~noisy], marker=marker, color=color)
            ax.scatter(
                part["context"][noisy], y[noisy], marker=marker, facecolors="none", edgecolors=color
            )
        if "analytic_limit" in part:
            limit = part["analytic_limit"]
            ax.plot(part["context"], limit, ":", color=color, label=f"{name}, limit")
    ax.set_xlabel("context length s (tokens)", fontsize=11)
    ax.set_ylabel("TTFT speedup vs full context (×)", fontsize=11)
    ax.set_title("hollow points: noisy rows (see the table's noise column)", fontsize=9)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
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

    shown = compact(table, drop=("decoder_hash", "encoder_hash"))
    ttft_table = _ttft_shown(ttft) if ttft is not None and len(ttft) else None
    qa_raw = pd.read_csv(qa_csv).astype({"k": "Int64"}) if qa_csv else None
    qa = compact(qa_raw) if qa_raw is not None else None
    lines = headline(table, qa_raw, ttft)
    main = table1(table)
    env = environment()
    md = [
        "# REFRAG experiment report",
        "",
        *[f"- {line}" for line in lines],
        "",
        "## Table 1: log-perplexity [95% interval] and context benefit retained",
        "",
        main.to_markdown(index=False),
        "",
        "## Perplexity, every row",
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
    md += ["", "## Hardware and versions", "", *[f"- {k}: {v}" for k, v in env.items()]]
    md_out.write_text("\n".join(md) + "\n")

    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    body = [
        f"<h1>REFRAG experiment report</h1><ul class='headline'>{items}</ul>",
        "<h2>Table 1: log-perplexity [95% interval] and context benefit retained</h2>",
        main.to_html(index=False),
        f"<h2>Perplexity, every row</h2><p class='note'>{html.escape(_caption())}</p>",
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
    body += [
        "<h2>Hardware and versions</h2><ul class='note'>",
        *[f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in env.items()],
        "</ul>",
    ]
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


def _label(row) -> str:
    variant, k = row["variant"], row.get("k")
    p = row.get("p")
    name = variant if pd.isna(k) else f"{variant} k={int(k)}"
    return name if p is None or pd.isna(p) else f"{name} p={p:g}"


def table1(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 1 layout: one row per method (baselines, then REFRAG by k), one
    column per eval set: log-ppl [95%] (and the context benefit retained [95%])."""
    rows: dict[str, dict[str, str]] = {}
    for _, row in table.iterrows():
        cells = rows.setdefault(_label(row), {"method": _label(row)})
        cells[f"{row['eval_set']} log-ppl"] = with_interval(
            row["log_ppl"], row.get("log_ppl_lo"), row.get("log_ppl_hi")
        )
        cells[f"{row['eval_set']} retained"] = with_interval(
            row.get("context_benefit_retained"), row.get("retained_lo"), row.get("retained_hi")
        )
    return pd.DataFrame(list(rows.values())).fillna("")


def headline(table: pd.DataFrame, qa: pd.DataFrame | None, ttft: pd.DataFrame | None) -> list[str]:
    """One sentence per result, with its interval and what it was measured on."""
    lines = []
    for eval_set, part in table.groupby("eval_set"):
        refrag = part[(part["variant"] == "refrag") & part["k"].notna()].sort_values("k")
        if len(refrag):
            shares = "; ".join(
                f"k={int(r['k'])}: "
                + with_interval(
                    r["context_benefit_retained"], r.get("retained_lo"), r.get("retained_hi")
                )
                for _, r in refrag.iterrows()
            )
            n = part["n_windows"].iloc[0] if "n_windows" in part else "?"
            docs = part["n_documents"].iloc[0] if "n_documents" in part else "?"
            lines.append(
                f"Context benefit retained by REFRAG ({eval_set}: {n} windows of {docs} documents, "
                f"95% interval over documents): {shares}."
            )
    if qa is not None and "choice_gain" in qa:
        for _, r in qa[(qa["variant"] == "full_context") & ~qa["sft"]].iterrows():
            best = qa[qa["variant"] == "refrag"].sort_values("choice_accuracy").tail(1)
            refrag = "".join(
                f"; the best REFRAG row (k={int(b['k'])}, sft {b['sft']}) gains "
                + with_interval(b["choice_gain"], b["choice_gain_lo"], b["choice_gain_hi"])
                for _, b in best.iterrows()
            )
            lines.append(
                f"Multiple-choice QA ({r['n_choice_questions']} questions from {r['n_documents']} "
                f"{r['eval_set']} documents): reading the passage as tokens gains "
                + with_interval(r["choice_gain"], r["choice_gain_lo"], r["choice_gain_hi"])
                + f" accuracy over no passage{refrag}."
            )
    if ttft is not None and len(ttft):
        for _, r in ttft[ttft["k"] == 16].sort_values("context").tail(1).iterrows():
            noisy = r.get("noise") not in (None, "", "[]") and not pd.isna(r.get("noise"))
            lines.append(
                f"TTFT at s={r['context']}, k=16 ({r.get('decoder', '')}): "
                f"{with_interval(r['speedup_cached'], None, None) or 'suspect'}× with cached "
                f"chunk embeddings, {with_interval(r['speedup_recomputed'], None, None) or 'suspect'}× "
                f"recomputed (limit {r.get('analytic_limit', '?')}×)"
                + (" — NOISY, not a result: " + str(r["noise"]) if noisy else "")
                + "."
            )
    return lines


def _ttft_shown(ttft: pd.DataFrame) -> pd.DataFrame:
    shown = compact(ttft)
    if "noise" in ttft:
        shown["noise"] = [
            "" if v in ("[]", "") or pd.isna(v) else f"NOISY: {v}" for v in ttft["noise"]
        ]
    return shown


def environment() -> dict[str, str]:
    """The hardware and versions that produced the report."""
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or '?'}",
        "GPU": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "system": platform.platform(),
    }


def _scroll(table_html: str) -> str:
    return f"<div style='overflow-x:auto'>{table_html}</div>"


def _caption() -> str:
    return (
        "log_ppl: mean negative log-likelihood (nats) per target token of held-out continuations "
        "(o tokens after s context tokens); lower is better. no_context: the decoder sees no context; "
        "full_context: the context as tokens; full_context_encoder_text: the context's encoder "
        "tokens decoded and re-tokenized (what the encoder can pass on at best: REFRAG's "
        "ceiling); refrag: the context as chunk "
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
