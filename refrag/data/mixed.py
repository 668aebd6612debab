"""Mixed inputs of selective compression: some chunks of a context read as decoder tokens of
their text, the rest as chunk embeddings (see :mod:`refrag.eval.selective`): a window's
context (:func:`mixed_parts`) or the ``<doc>`` documents of a prompt (:func:`expanded_parts`).

An expanded chunk's text is cut from the context at the character ends of its encoder tokens
(never decoded from encoder ids, so an encoder with another tokenizer, even an uncased one,
works) and tokenized by the decoder tokenizer."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

from refrag.data.shards import first_scored
from refrag.modeling.tokenization import RefragTokenizer


# -- mixed inputs ---------------------------------------------------------------------------
def expand_count(n_chunks: int, p: float) -> int:
    """How many of ``n_chunks`` chunks are expanded at fraction ``p``: ``⌊p·n⌋`` (at most p)."""
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return math.floor(p * n_chunks + 1e-9)


def chunk_spans(row: dict, k: int) -> list[tuple[int, int]]:
    """Character span of each chunk of a window's context: chunk i covers the encoder tokens
    ``i·k … i·k+k−1``, from the end of the previous chunk's last token to the end of its own."""
    return spans_at(list(row["context_encoder_ends"]), k)


def spans_at(ends: Sequence[int], k: int) -> list[tuple[int, int]]:
    """:func:`chunk_spans` of a text whose encoder tokens end at the characters ``ends``."""
    spans, start = [], 0
    for i in range(0, len(ends), k):
        end = ends[min(i + k, len(ends)) - 1]
        spans.append((start, end))
        start = end
    return spans


def text_parts(
    text: str,
    encoder_ids: Sequence[int],
    ends: Sequence[int],
    tok: RefragTokenizer,
    expand: Iterable[int],
) -> list[tuple[str, list[int]]]:
    """:meth:`RefragTokenizer.encode_parts` parts of a text (its encoder ids, ending at the
    characters ``ends``) whose chunks ``expand`` are decoder tokens of their text (``prompt``,
    not labelled) and the others chunk embeddings (``chunks``)."""
    k, expand = tok.compression, set(expand)
    parts: list[tuple[str, list[int]]] = []
    run: list[int] = []  # encoder ids of consecutive compressed chunks (whole chunks: rows stay)
    for i, (start, end) in enumerate(spans_at(ends, k)):
        if i in expand:
            if run:
                parts.append(("chunks", run))
                run = []
            ids = tok.decoder_tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
            parts.append(("prompt", ids))
        else:
            run += list(encoder_ids[i * k : (i + 1) * k])
    if run:
        parts.append(("chunks", run))
    return parts


def mixed_parts(
    row: dict, tok: RefragTokenizer, expand: Iterable[int], target: bool = True
) -> list[tuple[str, list[int]]]:
    """:meth:`RefragTokenizer.encode_parts` parts of a window whose chunks ``expand`` are
    decoder tokens of their text and the others chunk embeddings; then the target (labelled)."""
    parts = text_parts(
        row["context_text"], row["context_encoder_ids"], row["context_encoder_ends"], tok, expand
    )
    if not target:
        return parts
    skip, ids = first_scored(tok), list(row["target_ids"])  # as every evaluation row scores
    return [*parts, ("prompt", ids[:skip]), ("text", ids[skip:])]


def expanded_parts(
    tok: RefragTokenizer, text: str, expand: Sequence[Iterable[int]]
) -> list[tuple[str, list[int]]]:
    """:meth:`RefragTokenizer.encode_parts` parts of a text with ``<doc>`` tags (as
    :meth:`RefragTokenizer.encode` reads it) whose j-th document has its chunks ``expand[j]``
    read as decoder tokens of their text; with nothing expanded, exactly ``encode``'s parts."""
    segments = tok.parse_and_tokenize(text)
    docs = [seg for seg in segments if seg.type == "encoder"]
    if len(expand) != len(docs):
        raise ValueError(f"{len(expand)} selections for {len(docs)} documents")
    selections = iter(expand)
    parts: list[tuple[str, list[int]]] = []
    for seg in segments:
        if seg.type == "decoder":
            parts.append(("text", seg.tokens))
            continue
        selection = next(selections)
        if not seg.tokens:
            continue
        enc = tok.encoder_tokenizer(
            seg.raw_text,
            add_special_tokens=False,
            split_special_tokens=True,
            return_offsets_mapping=True,
        )
        if enc["input_ids"] != seg.tokens:
            raise AssertionError(f"document {seg.meta['id']!r} tokenized two ways")
        ends = [end for _, end in enc["offset_mapping"]]
        parts += text_parts(seg.raw_text, seg.tokens, ends, tok, selection)
    return parts


def document_positions(parts: Sequence[tuple[str, list[int]]], k: int) -> int:
    """Decoder positions the documents of :func:`expanded_parts` take: the tokens of their
    expanded chunks (``prompt`` parts) plus one per compressed chunk."""
    return sum(
        len(ids) if kind == "prompt" else math.ceil(len(ids) / k) * (kind == "chunks")
        for kind, ids in parts
    )


def context_positions(example: dict, tok: RefragTokenizer) -> int:
    """Decoder positions an encoded mixed input spends on its context (no BOS, no target)."""
    return len(example["input_ids"]) - sum(example["label_mask"]) - (tok.bos_token_id is not None)


def random_selection(n_chunks: int, p: float, rng: random.Random) -> list[int]:
    """``⌊p·n⌋`` distinct chunks drawn uniformly."""
    return sorted(rng.sample(range(n_chunks), expand_count(n_chunks, p)))
