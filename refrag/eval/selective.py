"""Selective compression: keep some chunks of the context as tokens, chosen by a policy.

A window's context is cut into L chunks of k encoder tokens (the rows the encoder reads).
A *mixed input* expands a chosen subset of them: an expanded chunk is its text (cut from
``context_text`` at the encoder tokens' character ends, ``context_encoder_ends``) tokenized
by the decoder; every other chunk stays one chunk embedding. The decoder reads
``Σ tokens(expanded) + #compressed`` context positions (:func:`mixed_parts`). At most a
fraction ``p`` is expanded: ``⌊p·L⌋`` chunks (:func:`expand_count`). Three ways to choose:

- ``refrag_random``: uniformly at random (also how the model is trained to read mixed
  inputs: :func:`mixed_dataset`, a fresh p ~ U[0, ``max_expand_fraction``] per example, as
  the paper trains with random p first);
- ``refrag_heuristic`` (perplexity heuristic): one decoder pass over the whole context as
  tokens gives each context token its NLL given the tokens before it; a chunk's score is the
  mean NLL of its tokens; the ``⌊p·L⌋`` chunks with the highest score are expanded (ties: the
  earlier chunk). Hard-to-predict text is what a chunk embedding is least likely to convey;
  this reads the full context once, so it is a reference, not a fast path;
- ``refrag_rl``: a small policy (:class:`~refrag.modeling.ChunkPolicy`: a 2-layer
  transformer over the chunk embeddings, one logit per chunk, held by the model as
  ``model.policy`` and saved with it) samples ``⌊p·L⌋`` distinct chunks without replacement
  (Gumbel-top-m, i.e. Plackett–Luce; padded chunks masked to −inf) and is trained with
  REINFORCE (:func:`reinforce_loss`): reward = −log-ppl of the window's continuation given
  the mixed input (the REFRAG model frozen), baseline = the mean reward of the other samples
  of the same window (leave-one-out), loss = −advantage · log π(selection). At evaluation the
  policy expands its top ``⌊p·L⌋`` logits.

Both trainings are stages of the registry (:mod:`refrag.train.stages`) and so run under
``train_stage`` (torchrun, resume): ``mixed`` (:func:`mixed_dataset` with
``refrag.train.trainers:causal_lm_trainer``, random p) and ``policy`` (:func:`policy_dataset` with
:func:`policy_trainer`, :class:`PolicyTrainer`: the Trainer's model is the policy alone, so
its checkpoints, DDP and optimizer hold only the policy; the stage's output folder is the
REFRAG model with its policy). :func:`evaluate_checkpoint` (the workflow's
``eval_selective``) writes a perplexity-table row per selector and p
(:func:`evaluate_selective`), scoring the same target tokens as every other row.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import BatchEncoding

from refrag.data.mixed import (
    chunk_spans,
    context_positions,
    document_positions,
    expand_count,
    expanded_parts,
    mixed_parts,
    random_selection,
)
from refrag.data.shards import first_scored, read_shards
from refrag.eval.scoring import result_row
from refrag.eval.tables import write_rows
from refrag.io.integrity import verify_folder
from refrag.io.runtime import pick_device
from refrag.modeling import ChunkPolicy, RefragModel
from refrag.modeling.modeling_refrag import labelled_tail
from refrag.modeling.tokenization import IGNORE_INDEX, RefragTokenizer

SELECTORS = ("refrag_rl", "refrag_random", "refrag_heuristic")


# -- scoring a window under several selections -------------------------------------------------
@torch.no_grad()
def chunk_embeddings(model, tok: RefragTokenizer, row: dict) -> torch.Tensor:
    """The projected embedding of every chunk of a window's context, ``(L, hidden)``."""
    batch = tok.pad([tok.encode_parts([("chunks", list(row["context_encoder_ids"]))])])
    device = next(model.parameters()).device
    return model.encode_chunks(
        batch["chunk_input_ids"].to(device), batch["chunk_attention_mask"].to(device)
    )


@torch.no_grad()
def selection_nll(
    model,
    tok: RefragTokenizer,
    row: dict,
    selections: Sequence[Iterable[int]],
    embeds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """For each selection of chunks to expand: summed target NLL, target token count and
    context positions. ``embeds`` are the window's chunk embeddings (the encoder is not rerun)."""
    examples = [tok.encode_parts(mixed_parts(row, tok, s)) for s in selections]
    batch = tok.pad(examples)
    device = embeds.device
    kept = torch.cat(
        [embeds[[i for i in range(len(embeds)) if i not in set(s)]] for s in selections]
    )
    keep = labelled_tail(batch["labels"])  # only the positions that predict targets
    logits = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        chunk_mask=batch["chunk_mask"].to(device),
        chunk_embeds=kept,
        logits_to_keep=keep,
    ).logits
    labels = batch["labels"][:, -keep:][:, 1:].to(device)
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    count = (labels != IGNORE_INDEX).sum(1)
    return nll.sum(1), count, [context_positions(e, tok) for e in examples]


@torch.no_grad()
def chunk_surprise(model, tok: RefragTokenizer, row: dict) -> torch.Tensor:
    """The perplexity heuristic's score of each chunk: mean decoder NLL of its tokens, reading
    the whole context as tokens (after BOS where the tokenizer adds one)."""
    spans = chunk_spans(row, tok.compression)
    pieces = [
        tok.decoder_tokenizer(row["context_text"][a:b], add_special_tokens=False)["input_ids"]
        for a, b in spans
    ]
    bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
    ids = torch.tensor([bos + [t for piece in pieces for t in piece]])
    device = next(model.parameters()).device
    logits = model.decoder(input_ids=ids.to(device)).logits[0, :-1].float()
    nll = F.cross_entropy(logits, ids[0, 1:].to(device), reduction="none")
    if not bos:  # the first context token has nothing before it
        nll = torch.cat([nll.new_full((1,), float("nan")), nll])
    scores, start = [], 0  # nll[j]: NLL of context token j
    for piece in pieces:
        values = nll[start : start + len(piece)]
        values = values[~values.isnan()]
        scores.append(values.mean() if len(values) else nll.new_zeros(()))
        start += len(piece)
    return torch.stack(scores)


def top_selection(scores: torch.Tensor, m: int) -> list[int]:
    """The ``m`` highest-scoring chunks (ties: the earlier one), sorted."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:m])


@torch.no_grad()
def policy_batch(
    model, tok: RefragTokenizer, texts: Sequence[str], p: float, *, padding_side: str = "left"
) -> tuple[BatchEncoding, list[int]]:
    """``tok(texts)`` with the top ``⌊p·L⌋`` chunks of each ``<doc>`` (L chunks) by the
    model's policy read as decoder tokens (:func:`~refrag.data.mixed.expanded_parts`), and
    ``chunk_embeds`` of the compressed chunks (the encoder is not rerun); with the decoder
    positions each text's documents take."""
    policy = getattr(model, "policy", None)
    if policy is None:
        raise ValueError("refrag_rl needs a policy (a model trained by the policy stage)")
    docs = [
        [seg.tokens for seg in tok.parse_and_tokenize(text) if seg.type == "encoder"]
        for text in texts
    ]
    rows = tok.pad([tok.encode_parts([("chunks", d) for d in text_docs]) for text_docs in docs])
    device = next(model.parameters()).device
    embeds = model.encode_chunks(
        rows["chunk_input_ids"].to(device), rows["chunk_attention_mask"].to(device)
    )
    encoded, kept, positions, at = [], [], [], 0
    for text, text_docs in zip(texts, docs):
        selections = []
        for ids in text_docs:
            n = -(-len(ids) // tok.compression)
            doc = embeds[at : at + n]
            at += n
            chosen = top_selection(policy(doc[None])[0], expand_count(n, p)) if n else []
            selections.append(chosen)
            kept.append(doc[[i for i in range(n) if i not in set(chosen)]])
        parts = expanded_parts(tok, text, selections)
        encoded.append(tok.encode_parts(parts))
        positions.append(document_positions(parts, tok.compression))
    batch = tok.pad(encoded, padding_side=padding_side)
    batch["chunk_embeds"] = torch.cat(kept) if kept else embeds[:0]
    return batch, positions


# -- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def score_selective(
    model,
    tok: RefragTokenizer,
    windows: Sequence[dict],
    *,
    p: float,
    selector: str,
    policy: ChunkPolicy | None = None,
    seed: int = 0,
) -> list[dict]:
    """One :func:`refrag.eval.scoring.score_windows` record per window, with ``⌊p·L⌋`` of its
    chunks expanded, chosen by ``selector`` (one of :data:`SELECTORS`; ``refrag_rl``: the
    model's ``policy`` unless ``policy`` is given); ``positions`` are the decoder positions
    its context took."""
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; selectors: {', '.join(SELECTORS)}")
    policy = policy if policy is not None else getattr(model, "policy", None)
    if selector == "refrag_rl" and policy is None:
        raise ValueError("refrag_rl needs a policy (a model trained by the policy stage)")
    model.eval()
    rng, skip = random.Random(seed), first_scored(tok)
    records = []
    for row in tqdm(windows, desc=f"{selector} p={p}", mininterval=5):
        embeds = chunk_embeddings(model, tok, row)
        m = expand_count(len(embeds), p)
        if selector == "refrag_random":
            chosen = random_selection(len(embeds), p, rng)
        elif selector == "refrag_heuristic":
            chosen = top_selection(chunk_surprise(model, tok, row), m)
        else:
            chosen = top_selection(policy.to(embeds.device)(embeds[None])[0], m)
        nll, count, positions = selection_nll(model, tok, row, [chosen], embeds)
        scored = list(range(skip, len(row["target_ids"])))
        if int(count[0]) != len(scored):
            raise AssertionError(f"scored {int(count[0])} target tokens, expected {len(scored)}")
        records.append(
            {
                "doc_id": str(row["doc_id"]),
                "window": int(row["window"]),
                "nll": float(nll[0]),
                "tokens": len(scored),
                "scored": scored,
                "positions": positions[0],
                "context_tokens": len(row["context_ids"]),
            }
        )
    return records


def evaluate_selective(
    model,
    tok: RefragTokenizer,
    windows: Sequence[dict],
    *,
    p: float,
    selector: str,
    policy: ChunkPolicy | None = None,
    seed: int = 0,
    **labels,
) -> dict:
    """An evaluation result row (:func:`refrag.eval.scoring.result_row`: token-weighted
    log-ppl, mean ``positions``, ``compression`` = context tokens / positions, per-window
    sums for the bootstrap) of :func:`score_selective`, as variant ``selector`` at ``p``."""
    records = score_selective(model, tok, windows, p=p, selector=selector, policy=policy, seed=seed)
    return result_row(records, list(windows), variant=selector, p=p, **labels)


def evaluate_checkpoint(
    *,
    shards: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    fractions: Sequence[float],
    seed: int = 0,
    labels: dict | None = None,
) -> list[dict]:
    """Every selector of :data:`SELECTORS` at every fraction of ``fractions`` on a shard
    folder, with a policy stage's ``checkpoint`` (its mixed-input model and policy). Writes
    the JSON list of result rows (:func:`evaluate_selective`, stage and k from the
    checkpoint), which the perplexity table reads beside the other evaluations."""
    verify_folder(checkpoint)
    model = RefragModel.from_pretrained(checkpoint).to(pick_device())
    tok = RefragTokenizer.from_pretrained(checkpoint)
    stage = json.loads(Path(checkpoint, "training_log.json").read_text())["stage"]
    windows = read_shards(shards).to_dict("records")
    rows = []
    for p in fractions:
        for selector in SELECTORS:
            row = evaluate_selective(
                model,
                tok,
                windows,
                p=p,
                selector=selector,
                seed=seed,
                k=model.config.compression,
                stage=stage,
                **(labels or {}),
            )
            rows.append(row)
            print({key: v for key, v in row.items() if key != "windows"})
    write_rows(rows, out)
    return rows
