"""Mixed inputs of selective compression: some chunks of a window's context read as decoder
tokens of their text, the rest as chunk embeddings (see :mod:`refrag.eval.selective`)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

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
    ends = list(row["context_encoder_ends"])
    spans, start = [], 0
    for i in range(0, len(ends), k):
        end = ends[min(i + k, len(ends)) - 1]
        spans.append((start, end))
        start = end
    return spans


def mixed_parts(
    row: dict, tok: RefragTokenizer, expand: Iterable[int], target: bool = True
) -> list[tuple[str, list[int]]]:
    """:meth:`RefragTokenizer.encode_parts` parts of a window whose chunks ``expand`` are
    decoder tokens of their text and the others chunk embeddings; then the target (labelled)."""
    k, enc = tok.compression, list(row["context_encoder_ids"])
    expand = set(expand)
    parts: list[tuple[str, list[int]]] = []
    run: list[int] = []  # encoder ids of consecutive compressed chunks (whole chunks: rows stay)
    for i, (start, end) in enumerate(chunk_spans(row, k)):
        if i in expand:
            if run:
                parts.append(("chunks", run))
                run = []
            text = row["context_text"][start:end]
            parts.append(
                ("prompt", tok.decoder_tokenizer(text, add_special_tokens=False)["input_ids"])
            )
        else:
            run += enc[i * k : (i + 1) * k]
    if run:
        parts.append(("chunks", run))
    if not target:
        return parts
    skip, ids = first_scored(tok), list(row["target_ids"])  # as every evaluation row scores
    return [*parts, ("prompt", ids[:skip]), ("text", ids[skip:])]


def context_positions(example: dict, tok: RefragTokenizer) -> int:
    """Decoder positions an encoded mixed input spends on its context (no BOS, no target)."""
    return len(example["input_ids"]) - sum(example["label_mask"]) - (tok.bos_token_id is not None)


def random_selection(n_chunks: int, p: float, rng: random.Random) -> list[int]:
    """``⌊p·n⌋`` distinct chunks drawn uniformly."""
    return sorted(rng.sample(range(n_chunks), expand_count(n_chunks, p)))
