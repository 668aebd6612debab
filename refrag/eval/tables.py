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
    "variant": "how the context was read: no_context, full_context, full_context_lowercase, "
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
    "variant": "how the passage was read: no_context, full_context (tokens), refrag (chunks)",
    "k": "compression of the REFRAG checkpoint (empty for the base decoder)",
    "sft": "whether the checkpoint was fine-tuned for QA",
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
