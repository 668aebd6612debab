"""Token alignment between a decoder and an encoder tokenization of the same text.

An alignment pair ``(c, r)`` says: the first ``c`` decoder tokens and the first ``r`` encoder
tokens cover the same text. Both are prefix lengths, so both are ``>= 1``.

Two ways to compute it:

- the reference definition (the seed's, i.e. the Hydra repository this project grew from):
  decode every prefix of both tokenizations and pair
  the prefixes whose strings are equal (:func:`compute_dp_matrix`,
  :func:`alignment_pairs_from_dp`). It costs O(N²) in decoding work and finds nothing for a
  normalizing tokenizer (an uncased encoder never decodes back to "Hello").
- :func:`align`: character offsets from fast tokenizers, in linear time. A pair is every place
  where both tokenizations end a token at the same character boundary. For tokenizers whose
  decoding reproduces the text this gives exactly the reference pairs (minus matches between
  two prefixes that both end inside one multi-byte character and decode to U+FFFD); for
  normalizing tokenizers it still finds the word boundaries.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

DecodeFn = Callable[[Sequence[int]], str]


def compute_prefix_strings(decode_fn: DecodeFn, ids: Sequence[int]) -> list[str]:
    """Decoded prefix of every length ``0 … len(ids)`` (one decode call per prefix: O(N²))."""
    return [decode_fn(list(ids[:n])) for n in range(len(ids) + 1)]


def compute_dp_matrix(
    *,
    encoder_ids: Sequence[int],
    decoder_ids: Sequence[int],
    encoder_decode_fn: DecodeFn,
    decoder_decode_fn: DecodeFn,
) -> np.ndarray:
    """Reference (slow) alignment table: ``dp[c, r]`` is True when the decoded prefix of the
    first ``c`` decoder tokens equals the decoded prefix of the first ``r`` encoder tokens.

    Shape ``(len(decoder_ids) + 1, len(encoder_ids) + 1)``; O(N²) decoding work and table.
    """
    dec = compute_prefix_strings(decoder_decode_fn, decoder_ids)
    enc = compute_prefix_strings(encoder_decode_fn, encoder_ids)
    dp = np.zeros((len(dec), len(enc)), dtype=bool)
    for c, dec_prefix in enumerate(dec):
        for r, enc_prefix in enumerate(enc):
            dp[c, r] = dec_prefix == enc_prefix
    return dp


def alignment_pairs_from_dp(dp: np.ndarray) -> list[tuple[int, int]]:
    """The ``(dec_prefix_len, enc_prefix_len)`` pairs, both ``>= 1``, of a DP table, sorted."""
    cs, rs = np.nonzero(dp[1:, 1:])
    return [(int(c) + 1, int(r) + 1) for c, r in zip(cs, rs)]


@dataclass(frozen=True)
class Alignment:
    """Both tokenizations of one text and their aligned prefix lengths, sorted."""

    decoder_ids: list[int]
    encoder_ids: list[int]
    pairs: list[tuple[int, int]]

    def token_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """Index of the last token of each aligned prefix, for decoder and encoder."""
        if not self.pairs:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        arr = np.asarray(self.pairs, dtype=np.int64) - 1
        return arr[:, 0], arr[:, 1]


def token_boundaries(
    tokenizer: PreTrainedTokenizerBase, text: str
) -> tuple[list[int], list[int | None]]:
    """Token ids of ``text`` and, for each prefix length ``n >= 1``, the character offset where
    the first ``n`` tokens end, or ``None`` where the ``n``-th token ends inside a character
    that the next token finishes (byte-level BPE splitting an emoji)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"align() needs a fast tokenizer (character offsets); got {type(tokenizer).__name__}"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    ends: list[int | None] = []
    for i, (_, end) in enumerate(offsets):
        next_start = offsets[i + 1][0] if i + 1 < len(offsets) else None
        ends.append(None if next_start is not None and next_start < end else end)
    # Leading tokens that decode to nothing (SentencePiece's prepended "▁") end at offset 0.
    n = 0
    while n < len(ids) and tokenizer.decode(ids[: n + 1]) == "":
        ends[n], n = 0, n + 1
    return ids, ends


def align(
    text: str,
    *,
    encoder_tokenizer: PreTrainedTokenizerBase,
    decoder_tokenizer: PreTrainedTokenizerBase,
) -> Alignment:
    """Linear-time alignment of the two tokenizations of ``text`` (no special tokens)."""
    dec_ids, dec_ends = token_boundaries(decoder_tokenizer, text)
    enc_ids, enc_ends = token_boundaries(encoder_tokenizer, text)
    enc_by_end: dict[int, list[int]] = defaultdict(list)
    for r, end in enumerate(enc_ends, start=1):
        if end is not None:
            enc_by_end[end].append(r)
    pairs = [
        (c, r)
        for c, end in enumerate(dec_ends, start=1)
        if end is not None
        for r in enc_by_end.get(end, ())
    ]
    return Alignment(dec_ids, enc_ids, pairs)
