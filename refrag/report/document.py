"""The report document: :func:`write_report` assembles given tables and figures into a
self-contained ``report.html`` (figures inlined) and a ``report.md`` that links them, with a
headline, the test table in the paper's Table 1 layout, and the hardware and versions;
:func:`write_ttft_table` merges TTFT benchmarks. Every function takes the paths it reads and
writes.
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
import transformers

from refrag.eval.tables import compact, with_interval
from refrag.report.plots import read_perplexity

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
    "ttit_machinery",
    "baseline_ttit_graph_ms",
    "refrag_ttit_graph_ms",
]


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
    sections: Sequence[tuple[str, str, pd.DataFrame]] = (),
) -> None:
    """Assemble the tables (perplexity, QA when ``qa_csv`` is given, ``sections`` of (title,
    caption, table) such as retrieval's, TTFT), ``figures`` (title → PNG) and DAG into ``html_out`` (inlined) and ``md_out`` (linking the files where
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
    for title, caption, frame in sections:
        md += [f"## {title}", "", caption, "", frame.to_markdown(index=False), ""]
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
    for title, caption, frame in sections:
        body += [f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(caption)}</p>"]
        body += [_scroll(frame.to_html(index=False))]
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
    "passage as chunk embeddings (k encoder tokens each); refrag_rl: the policy stage's "
    "model with a fraction p of the chunks, chosen by its policy, read as tokens. sft False: "
    "the base decoder (baselines), the cpt checkpoint (refrag) or the policy checkpoint "
    "(refrag_rl); sft True: the sft checkpoint. [*_lo, *_hi]: "
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
        for (eval_set, sft), rows in qa.groupby(["eval_set", "sft"], sort=True):
            gains = []
            for _, r in rows.sort_values("k", na_position="first", kind="stable").iterrows():
                if r["variant"] == "no_context":
                    continue
                if r["variant"] == "full_context":
                    name = "the passage as tokens"
                elif r["variant"] == "refrag_rl":
                    name = f"the policy (k={int(r['k'])}, p={r['p']:g})"
                else:
                    name = f"REFRAG k={int(r['k'])}"
                gain = with_interval(r["choice_gain"], r["choice_gain_lo"], r["choice_gain_hi"])
                gains.append(f"{name} gains {gain}")
            if gains:
                first = rows.iloc[0]
                lines.append(
                    f"Multiple-choice QA, {'after SFT' if sft else 'base decoder'} "
                    f"({first['n_choice_questions']} questions from {first['n_documents']} "
                    f"{eval_set} documents; accuracy over the base decoder without the passage): "
                    + "; ".join(gains)
                    + "."
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
