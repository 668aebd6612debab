"""The stages' training examples: alignment pairs, reconstruction with a curriculum of chunk
counts, and continuation (context as chunk embeddings, the next tokens as labels)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from refrag.data.shards import read_alignment_cache, read_shards
from refrag.modeling.tokenization import RefragTokenizer
from refrag.train.stages import StageConfig


class ExampleDataset(Dataset):
    """A list of :meth:`RefragTokenizer.encode_parts` outputs."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def shuffled_cycle(n: int, total: int, seed: int) -> list[int]:
    """``total`` indices into ``range(n)``: every item once per pass, each pass in a fresh
    seeded random order (so a stage reads all windows, not the first ``total`` in document
    order)."""
    rng = np.random.default_rng(seed)
    passes = -(-total // n) if n else 0
    return [int(i) for _ in range(passes) for i in rng.permutation(n)][:total]


def curriculum_lengths(curriculum: list[int], total: int, seed: int) -> list[int]:
    """Chunk counts of ``total`` reconstruction examples, in training order.

    Training runs in ``len(curriculum)`` equal phases; phase ``p`` draws each example's chunk
    count uniformly from ``curriculum[: p + 1]``, so lengths mix (short ones keep coming) while
    the longest grows to ``curriculum[-1]``, as in the paper's curriculum (its Table 8)."""
    rng = np.random.default_rng(seed)
    phases = len(curriculum)
    return [int(rng.choice(curriculum[: i * phases // total + 1])) for i in range(total)]


def reconstruction_examples(
    windows: pd.DataFrame, tok: RefragTokenizer, curriculum: list[int], total: int, seed: int = 0
) -> list[dict]:
    """``total`` examples in curriculum order (:func:`curriculum_lengths`): an example reads
    ``n`` chunks of a context (all its chunks where it has fewer) and must reproduce the text
    they cover, as decoder tokens. Contexts come from all windows, in a seeded random order."""
    k = tok.compression
    rows = windows.to_dict("records")
    examples = []
    lengths = curriculum_lengths(curriculum, total, seed)
    for n_chunks, r in zip(lengths, shuffled_cycle(len(rows), total, seed)):
        row = rows[r]
        enc_ids = list(row["context_encoder_ids"])
        n = min(n_chunks * k, len(enc_ids))
        if n == 0:
            continue
        text = row["context_text"][: row["context_encoder_ends"][n - 1]]
        target = tok.decoder_tokenizer(text, add_special_tokens=False)["input_ids"]
        examples.append(tok.encode_parts([("chunks", enc_ids[:n]), ("text", target)]))
    return examples


def continuation_examples(
    windows: pd.DataFrame, tok: RefragTokenizer, target_tokens: int | None = None
) -> list[dict]:
    """Context as chunk embeddings, then the target tokens (labelled): all of them, or the
    first ``target_tokens``."""
    return [
        tok.encode_parts(
            [
                ("chunks", list(row["context_encoder_ids"])),
                ("text", list(row["target_ids"][:target_tokens])),
            ]
        )
        for row in windows.to_dict("records")
    ]


def aligned_spans(row: dict, max_encoder_tokens: int) -> list[tuple[list[int], int]]:
    """(encoder span, decoder token) of one alignment-cache row: the encoder tokens between two
    consecutive aligned prefixes, where they cover exactly one decoder token and at most
    ``max_encoder_tokens`` encoder tokens."""
    spans, d_prev, e_prev = [], -1, -1
    for d, e in zip(row["decoder_index"], row["encoder_index"]):
        if d - d_prev == 1 and 0 < e - e_prev <= max_encoder_tokens:
            spans.append((list(row["encoder_ids"][e_prev + 1 : e + 1]), int(row["decoder_ids"][d])))
        d_prev, e_prev = d, e
    return spans


class AlignmentCollator:
    """Alignment-cache rows → one chunk row per aligned span (at most ``max_pairs``, an even
    random subset) and the decoder token each should become."""

    def __init__(self, tok: RefragTokenizer, max_pairs: int | None = None, seed: int = 0):
        self.tok, self.max_pairs = tok, max_pairs
        self.rng = torch.Generator().manual_seed(seed)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pairs = [p for row in rows for p in aligned_spans(row, self.tok.compression)]
        if self.max_pairs is not None and len(pairs) > self.max_pairs:
            keep = torch.randperm(len(pairs), generator=self.rng)[: self.max_pairs].sort().values
            pairs = [pairs[i] for i in keep.tolist()]
        chunks = self.tok.pad([self.tok.encode_parts([("chunks", span)]) for span, _ in pairs])
        return {
            "chunk_input_ids": chunks["chunk_input_ids"],
            "chunk_attention_mask": chunks["chunk_attention_mask"],
            "pair_decoder_ids": torch.tensor([token for _, token in pairs], dtype=torch.long),
        }


# -- what the stages in refrag.train.stages are made of: (data, tok, hp) -> (dataset, collator) ------
def _total(hp: StageConfig) -> int:
    return hp.steps * hp.batch_size * hp.grad_accum


def alignment_dataset(
    data: str | os.PathLike, tok: RefragTokenizer, hp: StageConfig
) -> tuple[Dataset, AlignmentCollator]:
    """Rows of the alignment-pair cache, all of them in a random order, cycled to fill every
    step."""
    rows = read_alignment_cache(data).to_dict("records")
    dataset = ExampleDataset([rows[i] for i in shuffled_cycle(len(rows), _total(hp), hp.seed)])
    return dataset, AlignmentCollator(tok, max_pairs=hp.max_pairs, seed=hp.seed)


def reconstruction_dataset(
    data: str | os.PathLike, tok: RefragTokenizer, hp: StageConfig
) -> tuple[Dataset, object]:
    """Reconstruction examples of the train shards, in curriculum order."""
    examples = reconstruction_examples(
        read_shards(data), tok, hp.curriculum, _total(hp), seed=hp.seed
    )
    return ExampleDataset(examples), tok.pad


def continuation_dataset(
    data: str | os.PathLike, tok: RefragTokenizer, hp: StageConfig
) -> tuple[Dataset, object]:
    """Continuation examples of all train windows in a random order, cycled to fill every
    step."""
    base = continuation_examples(read_shards(data), tok, hp.target_tokens or None)
    order = shuffled_cycle(len(base), _total(hp), hp.seed)
    return ExampleDataset([base[i] for i in order]), tok.pad
