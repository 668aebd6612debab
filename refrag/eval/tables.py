"""The one writer of evaluation results, and what every column of the two tables means.

Each evaluation job writes its result rows as a JSON list (:func:`write_rows`); the table
jobs read them back (:func:`read_rows`) and write ``perplexity.csv`` and ``qa.csv``
(:func:`write_table`), columns ordered as :data:`PERPLEXITY_COLUMNS` / :data:`QA_COLUMNS`
describe them. Every write is atomic: a reader sees the old file or the new one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from refrag.io.integrity import atomic_file, write_json

PERPLEXITY_COLUMNS = {
    "variant": "how the context was read: no_context, full_context, full_context_encoder_text, "
    "refrag (the final stage's checkpoint), refrag_<stage> (another stage), refrag_rl / "
    "refrag_random / refrag_heuristic (selective compression: policy, random, perplexity)",
    "k": "compression: context tokens per chunk embedding (empty for the baselines)",
    "p": "selective compression: the fraction of chunks read as tokens",
    "eval_set": "the split scored (validation or test)",
    "log_ppl": "mean negative log-likelihood per target token, in nats (token-weighted)",
    "log_ppl_lo": "lower end of the 95% interval (bootstrap over documents)",
    "log_ppl_hi": "upper end of the 95% interval",
    "context_benefit_retained": "(no_context - row) / (no_context - full_context): the share "
    "of the full context's benefit this row keeps",
    "retained_lo": "lower end of its 95% interval (the three log-ppl from one resample)",
    "retained_hi": "upper end of its 95% interval",
    "positions": "mean decoder positions the context took",
    "compression": "context tokens / positions",
    "n_tokens": "target tokens scored (the same tokens in every row of a group)",
    "n_windows": "windows scored",
    "n_documents": "documents the windows come from",
}
QA_COLUMNS = {
    "variant": "how the passage was read: no_context, full_context (tokens), refrag (chunks), "
    "refrag_rl (chunks, a fraction p of them read as tokens, chosen by the policy)",
    "k": "compression of the REFRAG checkpoint (empty for the base decoder)",
    "sft": "whether the checkpoint was fine-tuned for QA",
    "p": "refrag_rl: the fraction of the passage's chunks read as tokens",
    "eval_set": "the split the questions come from",
    "exact_match": "share of answers equal to the gold answer after SQuAD normalization",
    "exact_match_lo": "lower end of the 95% interval (bootstrap over documents)",
    "exact_match_hi": "upper end of the 95% interval",
    "f1": "mean bag-of-tokens F1 against the gold answer",
    "f1_lo": "lower end of the 95% interval",
    "f1_hi": "upper end of the 95% interval",
    "choice_accuracy": "multiple choice: share of questions whose highest-scoring candidate "
    "(mean log-likelihood per token given the prompt) is the gold answer",
    "choice_accuracy_lo": "lower end of the 95% interval (bootstrap over documents)",
    "choice_accuracy_hi": "upper end of the 95% interval",
    "choice_gain": "choice_accuracy minus that of the base decoder without the passage "
    "(no_context, sft False): what reading the passage this way buys",
    "choice_gain_lo": "lower end of its 95% interval (paired: both from one resample)",
    "choice_gain_hi": "upper end of its 95% interval",
    "n_questions": "questions answered",
    "n_choice_questions": "questions with candidate answers (the multiple-choice score's count)",
    "n_documents": "documents the questions come from",
}


def write_rows(rows: list[dict], out: str | os.PathLike) -> None:
    """One evaluation job's result rows, as a JSON list."""
    write_json(out, rows)


def read_rows(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """The result rows of every JSON list in ``paths``, in order."""
    return [row for path in paths for row in json.loads(Path(path).read_text())]


def ordered(frame: pd.DataFrame, columns: dict[str, str], drop: Iterable[str] = ()) -> pd.DataFrame:
    """``frame`` with the described ``columns`` first (those present, in their order), then
    the rest, less ``drop``."""
    first = [c for c in columns if c in frame.columns]
    rest = [c for c in frame.columns if c not in first and c not in set(drop)]
    return frame[first + rest]


def write_table(frame: pd.DataFrame, out: str | os.PathLike) -> None:
    """A table as CSV (no index)."""
    with atomic_file(out) as tmp:
        frame.to_csv(tmp, index=False)


# -- how the report prints them -----------------------------------------------------------
INTERVALS = {  # value column: (lower end, upper end)
    "log_ppl": ("log_ppl_lo", "log_ppl_hi"),
    "context_benefit_retained": ("retained_lo", "retained_hi"),
    "exact_match": ("exact_match_lo", "exact_match_hi"),
    "f1": ("f1_lo", "f1_hi"),
    "choice_accuracy": ("choice_accuracy_lo", "choice_accuracy_hi"),
    "choice_gain": ("choice_gain_lo", "choice_gain_hi"),
}


def sig3(value) -> str:
    """A number to 3 significant figures (integers as they are); blank when missing."""
    if value is None or (not isinstance(value, str | list | dict) and pd.isna(value)):
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if float(value).is_integer() and abs(value) >= 100:
        return f"{int(value):,}"
    return f"{float(value):.3g}"


def with_interval(value, lo, hi) -> str:
    """``"x [lo, hi]"`` to 3 significant figures (just ``x`` without an interval)."""
    if sig3(lo) == "" or sig3(hi) == "":
        return sig3(value)
    return f"{sig3(value)} [{sig3(lo)}, {sig3(hi)}]"


def compact(frame: pd.DataFrame, drop: Iterable[str] = ()) -> pd.DataFrame:
    """``frame`` as the report prints it: each value with an interval as one ``"x [lo, hi]"``
    column, every other number to 3 significant figures, blanks for missing values."""
    out = frame.drop(columns=[c for c in drop if c in frame.columns]).copy()
    for value, (lo, hi) in INTERVALS.items():
        if value in out.columns and lo in out.columns and hi in out.columns:
            out[value] = [with_interval(*t) for t in zip(out[value], out[lo], out[hi])]
            out = out.drop(columns=[lo, hi])
    for column in out.columns:
        out[column] = [v if isinstance(v, str) else sig3(v) for v in out[column].astype(object)]
    return out
