"""The report's figures: each a function from input files to one PNG.

:func:`plot_perplexity` (log-perplexity per k with the baselines), :func:`plot_training`
(one panel per stage) and :func:`plot_ttft` (speedup against context length with the analytic
limit). Nothing here knows where a workflow keeps its files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from refrag.train.stages import STAGES  # noqa: E402

PathLike = str | os.PathLike


def read_perplexity(perplexity_csv: PathLike) -> pd.DataFrame:
    table = pd.read_csv(perplexity_csv)
    table["k"] = table["k"].astype("Int64")
    return table


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
