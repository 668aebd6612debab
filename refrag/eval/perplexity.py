"""Perplexity of held-out continuations given a context read several ways, with intervals.

For each window (s context tokens, o target tokens) the decoder predicts the target after:
``no_context`` (only BOS), ``full_context`` (the s context tokens),
``full_context_encoder_text`` (the context's encoder tokens decoded to text and re-tokenized by
the decoder: what survives the encoder's tokenizer, the ceiling of REFRAG with that encoder), or ``refrag`` (the context's chunk embeddings). ``log_ppl`` is the mean
negative log-likelihood per target token over all windows (token-weighted), in nats, as the
paper's Table 1. Every variant scores the same target tokens (:func:`check_same_tokens`), and
the table's 95% intervals come from a bootstrap over documents (:func:`bootstrap_table`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from transformers import AutoModelForCausalLM

from refrag.data.shards import read_shards
from refrag.eval.scoring import (
    BASELINES,
    context_benefit_retained,
    result_row,
    score_windows,
    window_parts,
)
from refrag.eval.statistics import bootstrap_ratio, document_sums
from refrag.eval.tables import PERPLEXITY_COLUMNS, ordered, write_rows
from refrag.io.integrity import verify_folder
from refrag.io.runtime import pick_device
from refrag.modeling import RefragModel
from refrag.modeling.modeling_refrag import load_pretrained
from refrag.modeling.tokenization import RefragTokenizer


def evaluate_windows(
    *,
    shards: str,
    out: str,
    checkpoint: str | None = None,
    encoder: str | None = None,
    decoder: str | None = None,
    labels: dict | None = None,
    batch_size: int = 8,
    baselines: tuple[str, ...] = BASELINES,
) -> list[dict]:
    """Evaluate a shard folder: a REFRAG ``checkpoint``, or the ``baselines`` of the
    ``decoder`` (``encoder`` only supplies the tokenizer pair). Writes a JSON list of result
    rows (:func:`result_row`)."""
    windows = read_shards(shards).to_dict("records")
    device = pick_device()
    if checkpoint is not None:
        verify_folder(checkpoint)
        model, tok = (
            RefragModel.from_pretrained(checkpoint),
            RefragTokenizer.from_pretrained(checkpoint),
        )
        stage = json.loads((Path(checkpoint) / "training_log.json").read_text())["stage"]
        runs = [("refrag", model.config.compression, stage)]
    else:
        model = load_pretrained(AutoModelForCausalLM, decoder)
        tok = RefragTokenizer.from_encoder_decoder_pretrained(
            encoder_name_or_path=encoder, decoder_name_or_path=decoder
        )
        runs = [(variant, None, None) for variant in baselines]
    model.to(device).eval()
    rows, scored = [], {}
    for variant, k, stage in runs:
        same = next((v for v in scored if same_sequences(windows, tok, v, variant)), None)
        if same is None:
            records = score_windows(model, tok, windows, variant, batch_size)
        else:  # the same token sequences give the same scores
            records = scored[same]
            print(f"{variant}: every window's sequence equals {same}'s; its scores reused")
        scored[variant] = records
        rows.append(
            result_row(records, windows, variant=variant, k=k, stage=stage, **(labels or {}))
        )
        print({key: v for key, v in rows[-1].items() if key != "windows"})
    write_rows(rows, out)
    return rows


def same_sequences(windows: list[dict], tok: RefragTokenizer, a: str, b: str) -> bool:
    """Whether variants ``a`` and ``b`` read every window as the same parts (e.g. the
    ceiling row ``full_context_encoder_text`` with an encoder sharing the decoder's
    tokenizer: the context unchanged)."""
    return all(window_parts(w, a, tok) == window_parts(w, b, tok) for w in windows)


GROUP = ["decoder", "encoder", "eval_set"]


def check_same_tokens(frame: pd.DataFrame) -> None:
    """Raise ``ValueError`` where rows of one decoder, encoder and eval set scored different
    target tokens (count or scored-token digest), naming the rows."""
    for key, part in frame.groupby(GROUP, dropna=False):
        if part["n_tokens"].nunique() > 1 or part["scored_digest"].nunique() > 1:
            detail = "; ".join(
                f"{r.variant} k={r.k} {r.stage}: {r.n_tokens} tokens, digest {r.scored_digest[:12]}"
                for r in part.itertuples()
            )
            raise ValueError(
                f"rows of {dict(zip(GROUP, key))} scored different target tokens "
                f"(rerun their evaluation on the same shards): {detail}"
            )


def bootstrap_table(
    frame: pd.DataFrame, samples: int, seed: int, level: float = 0.95
) -> pd.DataFrame:
    """Add ``log_ppl_lo/hi`` and ``retained_lo/hi`` (percentile intervals at ``level``) to the
    rows of ``frame``, by a bootstrap over documents within each decoder/encoder/eval set,
    resampled jointly for all its variants (the retained share's three log-ppl come from
    one resample)."""
    frame = frame.copy()
    tails = [(1 - level) / 2, (1 + level) / 2]
    for _, part in frame.groupby(GROUP, dropna=False):
        _, nll, tokens = document_sums(part.to_dict("records"))
        draws = bootstrap_ratio(nll, tokens, samples, seed)
        variants = list(part["variant"])
        frame.loc[part.index, ["log_ppl_lo", "log_ppl_hi"]] = np.quantile(draws, tails, 0).T
        if {"no_context", "full_context"} <= set(variants):
            none = draws[:, [variants.index("no_context")]]
            full = draws[:, [variants.index("full_context")]]
            with np.errstate(divide="ignore", invalid="ignore"):
                shares = (none - draws) / (none - full)
            frame.loc[part.index, ["retained_lo", "retained_hi"]] = np.nanquantile(
                shares, tails, 0
            ).T
    return frame


def perplexity_table(
    rows: list[dict],
    final_stage: str | None = None,
    bootstrap: dict | None = None,
) -> pd.DataFrame:
    """Result rows (:func:`result_row`) → the perplexity table: ``context_benefit_retained``
    against the baselines of the same decoder, encoder and eval set, 95% intervals by
    bootstrap over documents (``bootstrap``: ``samples``, ``seed``; default 1000, 0).
    Raises ``ValueError`` if rows of one group scored different tokens. REFRAG rows of
    ``final_stage`` are the ``refrag`` variant; those of earlier stages ``refrag_<stage>``."""
    frame = pd.DataFrame(rows)
    missing = {"windows", "scored_digest", "n_tokens"} - set(frame.columns)
    if missing or frame[["windows", "scored_digest"]].isna().any().any():
        raise ValueError(
            "result rows without per-window sums or scored-token digest (written before "
            "evaluation kept them): rerun the evaluation (snakemake --forcerun eval_baselines "
            "eval_refrag)"
        )
    check_same_tokens(frame)
    is_earlier = (
        (frame["variant"] == "refrag") & frame["stage"].notna() & (frame["stage"] != final_stage)
    )
    if is_earlier.any():
        frame.loc[is_earlier, "variant"] = "refrag_" + frame.loc[is_earlier, "stage"]
    base = frame[frame["k"].isna()].set_index([*GROUP, "variant"])["log_ppl"]

    def retained(row) -> float:
        key = tuple(row[c] for c in GROUP)
        return context_benefit_retained(
            row["log_ppl"], base[(*key, "no_context")], base[(*key, "full_context")]
        )

    frame["context_benefit_retained"] = frame.apply(retained, axis=1)
    frame = bootstrap_table(frame, **({"samples": 1000, "seed": 0} | (bootstrap or {})))
    frame["k"] = frame["k"].astype("Int64")
    return ordered(frame, PERPLEXITY_COLUMNS, drop=("windows", "scored_digest"))
