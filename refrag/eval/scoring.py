"""Scoring held-out windows: each variant (no context, full context, the context as the
encoder's tokens give it back, REFRAG chunk embeddings) reads the same windows and is scored
on the same target tokens."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from refrag.data.shards import first_scored, start_token
from refrag.modeling.tokenization import IGNORE_INDEX, RefragTokenizer

BASELINES = ("no_context", "full_context", "full_context_encoder_text")


VARIANTS = (*BASELINES, "refrag")


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
    elif variant == "full_context_encoder_text":
        context = encoder_text_ids(row, tok)
    elif variant == "refrag":
        ids = list(row["context_encoder_ids"])
        return [("chunks", ids), *parts], -(-len(ids) // tok.compression)
    else:
        raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    return [("prompt", context), *parts], len(context)


def encoder_text_ids(row: dict, tok: RefragTokenizer) -> list[int]:
    """The context as the encoder sees it, back as decoder tokens: its encoder tokens
    (``context_encoder_ids``) decoded to text by the encoder tokenizer, then tokenized by the
    decoder's (text → encoder tokens → text). What is lost (case for an uncased encoder,
    characters outside its vocabulary) no chunk embedding can carry: this row is the ceiling
    of what REFRAG with this encoder can retain. With the decoder's own tokenizer it is the
    context unchanged."""
    text = tok.encoder_tokenizer.decode(list(row["context_encoder_ids"]), skip_special_tokens=True)
    return tok.decoder_tokenizer(text, add_special_tokens=False)["input_ids"]


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
