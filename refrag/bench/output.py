"""The TTFT rows as a printed table and a speedup-vs-context plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _cell(value: Any, none: str = "suspect") -> str:
    if value is None:
        return f"{none:>10}"
    return f"{value:>10.2f}" if isinstance(value, float) else f"{value!s:>10}"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "s",
        "k",
        "base ms",
        "baseline",
        "lookup ms",
        "cached ms",
        "recomp ms",
        "x cached",
        "x recomp",
        "limit",
        "TTIT base",
        "TTIT refrag",
        "TTITg base",
        "TTITg refr",
        "noise",
    )
    lines = [" | ".join(f"{h:>10}" for h in head)]
    for r in rows:
        cells = (
            r["context"],
            r["k"],
            r["baseline_ms"],
            r["baseline_attn"] + ("+graph" if r["baseline_graph"] else ""),
            r["cache_lookup_ms"],
            r["refrag_cached_ms"],
            r["refrag_recomputed_ms"],
            r["speedup_cached"],
            r["speedup_recomputed"],
            r["analytic_limit"],
            r["baseline_ttit_ms"],
            r["refrag_ttit_ms"],
            r.get("baseline_ttit_graph_ms"),
            r.get("refrag_ttit_graph_ms"),
            "NOISY" if r.get("noise") else "",
        )
        lines.append(
            " | ".join(
                _cell(c, "-" if i >= len(cells) - 5 else "suspect") for i, c in enumerate(cells)
            )
        )
    machinery = {(r["ttit_machinery"], r.get("ttit_graph_machinery")) for r in rows}
    for eager, graph in sorted(machinery, key=str):
        lines.append(f"TTIT (both sides): {eager}; TTITg (both sides): {graph}")
    return "\n".join(lines)


def format_profiles(rows: list[dict[str, Any]]) -> str:
    """One profiled prefill per row's baseline and cached REFRAG: ATen ops (compute ops,
    cat ops), kernels launched and the device's busy time against the wall time."""
    head = f"{'s':>6} {'k':>3} {'prefill':>9} {'aten ops':>9} {'compute':>8} {'cat':>5}"
    head += f" {'kernels':>8} {'busy ms':>9} {'wall ms':>9} {'busy':>6}"
    lines = [head]
    for r in rows:
        for name in ("baseline", "cached"):
            p = r["prefill_profile"][name]
            busy = p["device_busy_ms"] / p["wall_ms"] if p["kernels"] and p["wall_ms"] else None
            lines.append(
                f"{r['context']:>6} {r['k']:>3} {name:>9} {p['aten_ops']:>9}"
                f" {p['aten_compute_ops']:>8} {p['cat_ops']:>5} {p['kernels']:>8}"
                f" {p['device_busy_ms']:>9.2f} {p['wall_ms']:>9.2f}"
                f" {'-' if busy is None else f'{busy:.0%}':>6}"
            )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Speedup against s: one colour per k; cached solid, recomputed dashed, limit dotted."""
    # matplotlib only when a plot is asked for, on the Agg backend (no display on a GPU node)
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, k in enumerate(sorted({r["k"] for r in rows})):
        sub = sorted((r for r in rows if r["k"] == k), key=lambda r: r["context"])
        s = [r["context"] for r in sub]
        color = f"C{i}"
        nan = float("nan")  # a suspect ratio (None) is not drawn
        cached = [nan if r["speedup_cached"] is None else r["speedup_cached"] for r in sub]
        recomputed = [
            nan if r["speedup_recomputed"] is None else r["speedup_recomputed"] for r in sub
        ]
        ax.plot(s, cached, "o-", color=color, label=f"k={k} cached")
        ax.plot(s, recomputed, "s--", color=color, label=f"k={k} recomputed")
        ax.plot(
            s, [r["analytic_limit"] for r in sub], ":", color=color, alpha=0.6, label=f"k={k} limit"
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length s (tokens)")
    ax.set_ylabel("TTFT speedup over the fastest plain decoder")
    r0 = rows[0]
    ax.set_title(f"REFRAG TTFT: {r0['decoder']} on {r0['device']} ({r0['dtype']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
