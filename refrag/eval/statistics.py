"""Intervals by bootstrap over documents: a ratio of sums per row, resampled jointly."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd


def document_sums(rows: Iterable[dict]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Documents (sorted) and each row's summed NLL and token count per document:
    two arrays of shape (rows, documents)."""
    frames = [
        pd.DataFrame(row["windows"]).groupby("doc_id")[["nll", "tokens"]].sum() for row in rows
    ]
    docs = sorted(set().union(*(f.index for f in frames)))
    frames = [f.reindex(docs, fill_value=0) for f in frames]
    return (
        docs,
        np.stack([f["nll"].to_numpy(float) for f in frames]),
        np.stack([f["tokens"].to_numpy(float) for f in frames]),
    )


def bootstrap_ratio(totals: np.ndarray, counts: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Each row's ratio of sums, Σ totals / Σ counts over the documents (``totals``,
    ``counts``: rows × documents; e.g. summed NLL and tokens: the token-weighted log-ppl; or
    summed exact match and questions), in each of ``samples`` resamples of the documents with
    replacement, the same resamples for every row (paired): shape (samples, rows)."""
    rng = np.random.default_rng(seed)
    n_docs = totals.shape[1]
    picks = rng.integers(0, n_docs, size=(samples, n_docs))
    weights = np.zeros((samples, n_docs))
    np.add.at(weights, (np.arange(samples)[:, None], picks), 1.0)
    return (weights @ totals.T) / (weights @ counts.T)


def tokens_to_separate(
    a: dict, b: dict, *, samples: int = 1000, seed: int = 0, z: float = 1.96
) -> dict:
    """How far apart two evaluation rows (result rows with per-window sums, scored on the same
    documents) are: their log-ppl difference ``a − b``, its 95% interval by the paired
    bootstrap over documents, and ``tokens_needed``, the number of scored target tokens at
    which a normal interval of the difference (±``z`` bootstrap standard errors, the error
    shrinking as 1/√tokens) would exclude zero: ``n_tokens · (z·se / |diff|)²`` (the tokens
    scored now when it already does)."""
    _, nll, tokens = document_sums([a, b])
    draws = bootstrap_ratio(nll, tokens, samples, seed)
    diff = draws[:, 0] - draws[:, 1]
    point = float(nll[0].sum() / tokens[0].sum() - nll[1].sum() / tokens[1].sum())
    se, n = float(diff.std(ddof=1)), float(tokens[0].sum())
    lo, hi = np.quantile(diff, [0.025, 0.975])
    needed = n * (z * se / abs(point)) ** 2 if point else float("inf")
    return {
        "diff": point,
        "diff_lo": float(lo),
        "diff_hi": float(hi),
        "n_tokens": int(n),
        "tokens_needed": int(np.ceil(max(needed, n))) if np.isfinite(needed) else None,
    }
