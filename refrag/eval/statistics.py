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
