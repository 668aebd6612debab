"""Tokenized shards and the alignment-pair cache.

A *window* is ``context_tokens`` (s) decoder tokens of a document followed by
``target_tokens`` (o) more: the decoder predicts the target from the context, read either as
tokens (full context), not at all (no context), or as chunk embeddings of the context's
encoder tokenization (REFRAG). Each window row holds both tokenizations of its context, the
encoder tokens' character ends (to cut the context at a chunk boundary for reconstruction),
and the target's decoder tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from refrag.data.alignment import align
from refrag.data.corpus import assign_split
from refrag.io.integrity import (
    IntegrityError,
    atomic_file,
    read_manifest,
    read_parquet,
    sha256_file,
    verify_file,
    write_json,
    write_parquet,
)
from refrag.modeling.tokenization import RefragTokenizer

SHARD_ROWS = 1000


def iter_windows(
    documents: Iterable[dict],
    *,
    encoder_tokenizer: PreTrainedTokenizerBase,
    decoder_tokenizer: PreTrainedTokenizerBase,
    context_tokens: int,
    target_tokens: int,
) -> Iterator[dict]:
    """Non-overlapping (context, target) windows of each document, in document order.

    ``context_text`` (what the encoder reads) ends where the target's first token starts, so
    it never holds target text, even where a byte-level token splits a multi-byte character
    between the context and the target (the context's last token then ends inside the
    character; the encoder does not see that character at all).
    """
    width = context_tokens + target_tokens
    for doc in documents:
        text = doc["text"]
        enc = decoder_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        for n, start in enumerate(range(0, len(ids) - width + 1, width)):
            cut = start + context_tokens
            ctx_end = min(offsets[cut - 1][1], offsets[cut][0])
            ctx_text = text[offsets[start][0] : ctx_end]
            enc_ctx = encoder_tokenizer(
                ctx_text, add_special_tokens=False, return_offsets_mapping=True
            )
            yield {
                "doc_id": doc["doc_id"],
                "window": n,
                "context_text": ctx_text,
                "context_ids": ids[start : start + context_tokens],
                "target_ids": ids[start + context_tokens : start + width],
                "context_encoder_ids": enc_ctx["input_ids"],
                "context_encoder_ends": [end for _, end in enc_ctx["offset_mapping"]],
            }


def spread(rows: list[dict], limit: int | None) -> list[dict]:
    """At most ``limit`` rows, in list order: every document (``doc_id``) keeps a row while
    ``limit`` allows (a bootstrap over documents wants them all), the rest is shared in
    proportion to each document's rows (largest remainders), taken evenly within it."""
    if limit is None or len(rows) <= limit:
        return rows
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row["doc_id"], []).append(i)
    docs = list(groups)
    if limit < len(docs):  # one row from each of `limit` documents, spread evenly
        quota = dict.fromkeys((docs[int(i * len(docs) / limit)] for i in range(limit)), 1)
    else:
        rest, spare = limit - len(docs), len(rows) - len(docs)
        share = {d: (len(groups[d]) - 1) * rest / spare for d in docs}
        quota = {d: 1 + int(share[d]) for d in docs}
        by_remainder = sorted(docs, key=lambda d: share[d] - int(share[d]), reverse=True)
        for d in by_remainder[: limit - sum(quota.values())]:
            quota[d] += 1
    picked = [groups[d][int(j * len(groups[d]) / n)] for d, n in quota.items() for j in range(n)]
    return [rows[i] for i in sorted(picked)]


def start_token(tok: RefragTokenizer) -> int | None:
    """The token a sequence without context starts from when the decoder has no BOS: its EOS
    (the document separator it was trained to continue after), else none."""
    return tok.decoder_tokenizer.eos_token_id if tok.bos_token_id is None else None


def first_scored(tok: RefragTokenizer) -> int:
    """Target tokens every variant leaves unscored: 0, or 1 for a decoder with neither BOS nor
    EOS, where nothing can precede the first target token without context."""
    return int(tok.bos_token_id is None and start_token(tok) is None)


def write_shards(
    rows: list[dict], out_dir: str | os.PathLike, *, metadata: dict, shard_rows: int = SHARD_ROWS
) -> dict:
    """Parquet shards ``shard-NNNNN.parquet`` plus ``manifest.json`` (counts, checksums, metadata)."""
    if not rows:
        raise ValueError("no windows: documents are shorter than context_tokens + target_tokens")
    writer = ShardWriter(out_dir, shard_rows=shard_rows)
    for row in rows:
        writer.add(row)
    return writer.close(metadata)


class ShardWriter:
    """Rows in, ``shard-NNNNN.parquet`` files out as each fills (at most ``shard_rows`` rows
    held), then ``manifest.json`` (:meth:`close`): the same files as :func:`write_shards`."""

    def __init__(self, out_dir: str | os.PathLike, shard_rows: int = SHARD_ROWS):
        self.out_dir, self.shard_rows = Path(out_dir), shard_rows
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.pending: list[dict] = []
        self.shards: list[dict] = []
        self.rows, self.documents, self.last_doc = 0, 0, None

    def add(self, row: dict) -> None:
        """One row; a document's rows come one after the other (they are counted as runs)."""
        self.pending.append(row)
        self.rows += 1
        if row["doc_id"] != self.last_doc:
            self.documents, self.last_doc = self.documents + 1, row["doc_id"]
        if len(self.pending) == self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self.shards):05d}.parquet"
        with atomic_file(path) as tmp:
            pd.DataFrame(self.pending).to_parquet(tmp, index=False)
        self.shards.append(
            {"file": path.name, "rows": len(self.pending), "sha256": sha256_file(path)}
        )
        self.pending = []

    def close(self, metadata: dict) -> dict:
        """Write the last shard and the manifest (last: it vouches for the shards)."""
        if self.pending:
            self._flush()
        manifest = {
            "rows": self.rows,
            "documents": self.documents,
            "shards": self.shards,
        } | metadata
        write_json(self.out_dir / "manifest.json", manifest)
        return manifest


def tokenize_stream(
    documents: Iterable[dict],
    out_dir: str | os.PathLike,
    *,
    split: str,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    min_chars: int,
    max_windows: int | None,
    metadata: dict,
    shard_rows: int = SHARD_ROWS,
    **window_options: Any,
) -> dict:
    """Windows of the documents of ``split`` (by :func:`~refrag.data.corpus.assign_split`)
    among ``documents`` (a stream: one corpus shard), written as they come, the first
    ``max_windows`` of them; memory holds one document and one shard of rows, whatever the
    corpus's size. ``window_options``: :func:`iter_windows`'s tokenizers and lengths."""
    writer = ShardWriter(out_dir, shard_rows=shard_rows)
    mine = (
        d
        for d in documents
        if len(d["text"]) >= min_chars
        and assign_split(d["doc_id"], validation_fraction, test_fraction, seed) == split
    )
    for row in tqdm(iter_windows(mine, **window_options), desc="windows", mininterval=10):
        if max_windows is not None and writer.rows >= max_windows:
            break
        writer.add(row)
    return writer.close(metadata)


def gather_shards(
    parts: list[str | os.PathLike], out_dir: str | os.PathLike, metadata: dict
) -> dict:
    """One shard folder of the shard folders ``parts`` (in order): their files hard-linked
    (copied across file systems) as ``shard-NNNNN.parquet``, one manifest over all. Parts
    that say what they read (``read.source``, e.g. ``hf:<dataset>@<commit>``) must have read
    the same source: a dataset updated between two parts' jobs is refused."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, rows, documents, sources = [], 0, 0, set()
    for part in map(Path, parts):
        manifest = read_manifest(part / "manifest.json")
        if "source" in manifest.get("read", {}):
            sources.add(manifest["read"]["source"])
        if len(sources) > 1:
            raise ValueError(f"corpus parts read different sources: {', '.join(sorted(sources))}")
        for shard in manifest["shards"]:
            source = part / shard["file"]
            verify_file(source, shard["sha256"])
            target = out_dir / f"shard-{len(shards):05d}.parquet"
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
            shards.append(shard | {"file": target.name})
        rows += manifest["rows"]
        documents += manifest["documents"]  # a document lives in one corpus shard
    manifest = {"rows": rows, "documents": documents, "shards": shards} | metadata
    if sources:
        manifest["source"] = sources.pop()
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def read_shards(
    shard_dir: str | os.PathLike, verify: bool = True, rule: str | None = None
) -> pd.DataFrame:
    """All rows of a shard folder, checking each shard's checksum against the manifest;
    raises :class:`~refrag.io.integrity.IntegrityError` (naming the file) on any mismatch."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir / "manifest.json", rule)
    if not isinstance(manifest.get("shards"), list):
        raise IntegrityError(shard_dir / "manifest.json", "lists no shards", rule)
    frames = []
    for shard in manifest["shards"]:
        path = shard_dir / shard["file"]
        if verify:
            verify_file(path, shard["sha256"], rule)
        frames.append(pd.read_parquet(path))
    return pd.concat(frames, ignore_index=True)


def tokenizer_id(tokenizer: PreTrainedTokenizerBase) -> dict:
    """What identifies a tokenizer in a manifest: its name, class, size and a content hash."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return {
        "name_or_path": str(tokenizer.name_or_path),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "vocab_sha256": hashlib.sha256(vocab).hexdigest(),
    }


def build_alignment_cache(
    windows: pd.DataFrame,
    *,
    encoder_tokenizer: PreTrainedTokenizerBase,
    decoder_tokenizer: PreTrainedTokenizerBase,
    out: str | os.PathLike,
) -> int:
    """Aligned token pairs of every window's context, written as one Parquet file."""
    rows = []
    for text in tqdm(windows["context_text"], desc="aligning", mininterval=5):
        result = align(
            text, encoder_tokenizer=encoder_tokenizer, decoder_tokenizer=decoder_tokenizer
        )
        dec_idx, enc_idx = result.token_indices()
        rows.append(
            {
                "decoder_ids": result.decoder_ids,
                "encoder_ids": result.encoder_ids,
                "decoder_index": dec_idx.tolist(),
                "encoder_index": enc_idx.tolist(),
            }
        )
    write_parquet(pd.DataFrame(rows), out)  # with a digest of its contents, checked on read
    return sum(len(r["decoder_index"]) for r in rows)


def read_alignment_cache(path: str | os.PathLike, rule: str | None = None) -> pd.DataFrame:
    """The alignment cache, verified against the digest written with it."""
    return read_parquet(path, rule)
