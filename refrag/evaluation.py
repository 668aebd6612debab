"""Perplexity of held-out continuations given a context read several ways, with intervals.

For each window (s context tokens, o target tokens) the decoder predicts the target after:
``no_context`` (only BOS), ``full_context`` (the s context tokens), ``full_context_lowercase``
(the context's text lowercased and re-tokenized by the decoder: what survives an uncased
encoder, at best), or ``refrag`` (the context's chunk embeddings). ``log_ppl`` is the mean
negative log-likelihood per target token over all windows (token-weighted), in nats, as the
paper's Table 1. Every variant scores the same target tokens (:func:`check_same_tokens`), and
the table's 95% intervals come from a bootstrap over documents (:func:`bootstrap_table`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from refrag.tokenization import IGNORE_INDEX, RefragTokenizer

BASELINES = ("no_context", "full_context", "full_context_lowercase")
VARIANTS = (*BASELINES, "refrag")


def start_token(tok: RefragTokenizer) -> int | None:
    """The token a sequence without context starts from when the decoder has no BOS: its EOS
    (the document separator it was trained to continue after), else none."""
    return tok.decoder_tokenizer.eos_token_id if tok.bos_token_id is None else None


def first_scored(tok: RefragTokenizer) -> int:
    """Target tokens every variant leaves unscored: 0, or 1 for a decoder with neither BOS nor
    EOS, where nothing can precede the first target token without context."""
    return int(tok.bos_token_id is None and start_token(tok) is None)


def window_parts(
    row: dict, variant: str, tok: RefragTokenizer
) -> tuple[list[tuple[str, list[int]]], int]:
    """The parts of one evaluation sequence (see :meth:`RefragTokenizer.encode_parts`) and
    the decoder positions its context takes (BOS and a start token are no context)."""
    skip = first_scored(tok)
    target = list(row["target_ids"])
    parts = [("prompt", target[:skip]), ("text", target[skip:])]
    if variant == "no_context":
        start = start_token(tok)
        return ([("prompt", [start])] if start is not None else []) + parts, 0
    if variant == "full_context":
        context = list(row["context_ids"])
    elif variant == "full_context_lowercase":
        context = tok.decoder_tokenizer(row["context_text"].lower(), add_special_tokens=False)[
            "input_ids"
        ]
    elif variant == "refrag":
        ids = list(row["context_encoder_ids"])
        return [("chunks", ids), *parts], -(-len(ids) // tok.compression)
    else:
        raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    return [("prompt", context), *parts], len(context)


@torch.no_grad()
def score_windows(
    model, tok: RefragTokenizer, windows: Iterable[dict], variant: str, batch_size: int = 8
) -> list[dict]:
    """One record per window: ``doc_id``, ``window``, ``nll`` (summed over its scored target
    tokens), ``tokens`` (their count), ``scored`` (their indices in the target) and
    ``positions`` (decoder positions the context took). ``model`` is a ``RefragModel`` for
    ``refrag``, or any causal LM (the plain decoder) for the baselines."""
    rows = list(windows)
    device = next(model.parameters()).device
    skip = first_scored(tok)
    records = []
    for i in tqdm(range(0, len(rows), batch_size), desc=variant, mininterval=5):
        chunk = rows[i : i + batch_size]
        built = [window_parts(r, variant, tok) for r in chunk]
        batch = tok.pad([tok.encode_parts(parts) for parts, _ in built], padding_side="right")
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        labelled = labels != IGNORE_INDEX
        # the j-th labelled position is target token skip + j; position 0 predicts nothing
        target_index = labelled.long().cumsum(1) - 1 + skip
        scored_mask = labelled.clone()
        scored_mask[:, 0] = False
        # project only the positions that predict targets: padding is on the right, so the
        # last `keep` positions hold every row's targets and their predictors
        keep = labels.shape[1] - max(int(labelled.int().argmax(1).min()), 1) + 1
        if variant == "refrag":
            logits = model(**batch, logits_to_keep=keep).logits
        else:
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                logits_to_keep=keep,
            ).logits
        shift_labels = labels[:, -keep:][:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2),
            shift_labels,
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).sum(1)
        for b, (row, (_, positions)) in enumerate(zip(chunk, built)):
            scored = target_index[b][scored_mask[b]].tolist()
            records.append(
                {
                    "doc_id": str(row["doc_id"]),
                    "window": int(row["window"]),
                    "nll": float(nll[b]),
                    "tokens": len(scored),
                    "scored": scored,
                    "positions": positions,
                    "context_tokens": len(row["context_ids"]),
                }
            )
    return records


def target_nll(
    model, tok: RefragTokenizer, windows: Iterable[dict], variant: str, batch_size: int = 8
) -> tuple[float, int]:
    """Summed NLL of the target tokens of ``windows`` and their count."""
    records = score_windows(model, tok, windows, variant, batch_size)
    return sum(r["nll"] for r in records), sum(r["tokens"] for r in records)


def scored_digest(records: list[dict], windows: list[dict]) -> str:
    """SHA-256 of the scored (document, window, target index, token id) set of ``records``
    (from :func:`score_windows` over ``windows``): equal digests, same tokens scored."""
    targets = {(str(w["doc_id"]), int(w["window"])): list(w["target_ids"]) for w in windows}
    items = sorted(
        (r["doc_id"], r["window"], j, int(targets[(r["doc_id"], r["window"])][j]))
        for r in records
        for j in r["scored"]
    )
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def result_row(records: list[dict], windows: list[dict], **labels) -> dict:
    """One result row of the evaluation JSON: totals, the context's mean positions and real
    compression, the scored-token digest, and per-window sums (for the bootstrap)."""
    nll, tokens = sum(r["nll"] for r in records), sum(r["tokens"] for r in records)
    positions = float(np.mean([r["positions"] for r in records]))
    context = float(np.mean([r["context_tokens"] for r in records]))
    return labels | {
        "log_ppl": nll / tokens,
        "positions": positions,
        "compression": context / positions if positions else None,
        "n_windows": len(records),
        "n_documents": len({r["doc_id"] for r in records}),
        "n_tokens": tokens,
        "scored_digest": scored_digest(records, windows),
        "windows": [
            {k: r[k] for k in ("doc_id", "window", "nll", "tokens", "positions")} for r in records
        ],
    }


def context_benefit_retained(log_ppl: float, no_context: float, full_context: float) -> float:
    """(noctx − refrag) / (noctx − full): 1 is all of the full context's benefit, 0 none."""
    gap = no_context - full_context
    return float("nan") if gap == 0 else (no_context - log_ppl) / gap


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
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from refrag.data import read_shards
    from refrag.integrity import verify_folder
    from refrag.modeling import RefragModel
    from refrag.utils import pick_device

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
        model = AutoModelForCausalLM.from_pretrained(decoder)
        tok = RefragTokenizer.from_encoder_decoder_pretrained(
            encoder_name_or_path=encoder, decoder_name_or_path=decoder
        )
        runs = [(variant, None, None) for variant in baselines]
    model.to(device).eval()
    rows = []
    for variant, k, stage in runs:
        records = score_windows(model, tok, windows, variant, batch_size)
        rows.append(
            result_row(records, windows, variant=variant, k=k, stage=stage, **(labels or {}))
        )
        print({key: v for key, v in rows[-1].items() if key != "windows"})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


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
    first = [
        "variant",
        "k",
        "p",
        "eval_set",
        "log_ppl",
        "log_ppl_lo",
        "log_ppl_hi",
        "context_benefit_retained",
        "retained_lo",
        "retained_hi",
        "positions",
        "compression",
        "n_tokens",
        "n_windows",
        "n_documents",
    ]
    first = [c for c in first if c in frame.columns]
    rest = [c for c in frame.columns if c not in first and c not in ("windows", "scored_digest")]
    return frame[first + rest]
