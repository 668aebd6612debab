"""The document-tag tokenizer.

Text outside ``<doc id="…">…</doc>`` tags is tokenized by the decoder tokenizer; text inside
by the encoder tokenizer, packed into rows of ``compression`` (k) tokens, each of which the
model compresses into one chunk embedding::

    tok = RefragTokenizer(encoder_tokenizer=…, decoder_tokenizer=…, compression=16)
    tok = RefragTokenizer.from_encoder_decoder_pretrained(
        encoder_name_or_path="embedded:all-minilm-l6-v2",
        decoder_name_or_path="embedded:smollm2-135m-instruct",
    )
    segments = tok.parse_and_tokenize("Q: who? <doc id='1'>Ada Lovelace was …</doc> A:")
    batch = tok(["…", "…"])          # padded tensors for the model

Special tokens, chosen explicitly:

- the decoder sequence starts with the decoder's BOS token when ``add_bos`` (default) and the
  decoder tokenizer has one; segments themselves never carry special tokens;
- every chunk row the encoder reads is ``[CLS] t_1 … t_m [SEP]`` (``m ≤ k``), padded to
  ``k + 2``, when ``encoder_special_tokens`` (default) and the encoder tokenizer has them; the
  model takes the first position's state as the chunk's embedding.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoTokenizer, BatchEncoding, PreTrainedTokenizerBase

from refrag.io.integrity import refuse_code
from refrag.io.models import resolve_tokenizer_source as source

IGNORE_INDEX = -100


_TAG_START = re.compile(r"</?doc\b")


_OPEN_TAG = re.compile(r"<doc((?:\s+[^\s=>]+\s*=\s*(?:\"[^\"]*\"|'[^']*'))*)\s*>")


_CLOSE_TAG = re.compile(r"</doc\s*>")


_ATTRIBUTE = re.compile(r"([^\s=>]+)\s*=\s*(?:\"([^\"]*)\"|'([^']*)')")


class DocMarkupError(ValueError):
    """Bad ``<doc>`` markup; ``position`` is the character offset of the offending tag."""

    def __init__(self, message: str, position: int):
        super().__init__(f"{message} at position {position}")
        self.position = position


class UnclosedDocError(DocMarkupError):
    """A ``<doc>`` that is never closed."""


class NestedDocError(DocMarkupError):
    """A ``<doc>`` opened inside another one."""


class StrayCloseTagError(DocMarkupError):
    """A ``</doc>`` with no open ``<doc>``."""


class MissingDocIdError(DocMarkupError):
    """A ``<doc>`` without a non-empty ``id`` attribute."""


class DuplicateDocIdError(DocMarkupError):
    """Two documents with the same ``id``."""


class MalformedDocTagError(DocMarkupError):
    """Text that starts like a doc tag but does not parse as one."""


class EmptyDocumentWarning(UserWarning):
    """A ``<doc>`` whose text gives no encoder token: it adds no chunk (a retriever may return
    an empty passage; the prompt goes on without it)."""


class TextTypeError(TypeError):
    """Input that is not ``str`` (``bytes`` must be decoded first)."""


class InvalidTextError(ValueError):
    """A ``str`` that is not valid Unicode text (a lone surrogate); ``position`` is its offset."""

    def __init__(self, message: str, position: int):
        super().__init__(f"{message} at position {position}")
        self.position = position


class TextTooLargeError(ValueError):
    """A text over the tokenizer's size cap (``max_text_chars`` or ``max_chunk_rows``)."""


def check_text(text: object) -> str:
    """``text`` if it is a ``str`` of valid Unicode; else :class:`TextTypeError` or
    :class:`InvalidTextError` (a lone surrogate, e.g. from ``errors="surrogateescape"``)."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        raise TextTypeError(
            f"expected str, got {type(text).__name__}: decode it first (e.g. data.decode('utf-8'))"
        )
    if not isinstance(text, str):
        raise TextTypeError(f"expected str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidTextError(
            f"lone surrogate U+{ord(text[err.start]):04X} (not valid Unicode)", err.start
        ) from None
    return text


@dataclass
class Segment(Mapping):
    """One run of text: decoder text, or one document for the encoder.

    Readable as a mapping too (``seg["type"]``, ``seg["meta"]["id"]``), as in the seed (see :mod:`refrag`).
    ``start`` is the character offset of ``raw_text`` in the input.
    """

    type: Literal["decoder", "encoder"]
    raw_text: str
    start: int
    meta: dict[str, str] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    packed_tokens: list[list[int]] = field(default_factory=list)
    attention_mask: list[list[int]] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def _keys(self) -> list[str]:
        names = [f.name for f in fields(self)]
        if self.type == "decoder":
            names = [n for n in names if n not in ("meta", "packed_tokens", "attention_mask")]
        return names

    @property
    def num_chunks(self) -> int:
        return len(self.packed_tokens)


def parse_segments(text: str) -> list[Segment]:
    """Split ``text`` into decoder and document segments (no tokenization).

    Raises a :class:`DocMarkupError` subclass, naming the tag's character position, for an
    unclosed or nested ``<doc>``, a stray ``</doc>``, a missing or duplicate id, or a tag
    that does not parse; :class:`TextTypeError` / :class:`InvalidTextError` for input that
    is not a ``str`` of valid Unicode. Joining the segments' ``raw_text`` gives ``text`` without its tags.
    """
    check_text(text)
    segments: list[Segment] = []
    seen_ids: set[str] = set()
    open_doc: tuple[int, int, dict[str, str]] | None = None  # (tag position, body start, attrs)
    cursor = 0
    for match in _TAG_START.finditer(text):
        pos = match.start()
        if match.group().startswith("</"):
            tag = _CLOSE_TAG.match(text, pos)
            if tag is None:
                raise MalformedDocTagError("malformed </doc> tag", pos)
            if open_doc is None:
                raise StrayCloseTagError("</doc> without an open <doc>", pos)
            _, body_start, attrs = open_doc
            segments.append(Segment("encoder", text[body_start:pos], body_start, meta=attrs))
            open_doc, cursor = None, tag.end()
            continue
        tag = _OPEN_TAG.match(text, pos)
        if tag is None:
            raise MalformedDocTagError("malformed <doc> tag (attributes must be quoted)", pos)
        if open_doc is not None:
            raise NestedDocError(f"<doc> nested inside the <doc> opened at {open_doc[0]}", pos)
        attrs = {m[1]: m[2] if m[2] is not None else m[3] for m in _ATTRIBUTE.finditer(tag[1])}
        if not attrs.get("id"):
            raise MissingDocIdError("<doc> without an id", pos)
        if attrs["id"] in seen_ids:
            raise DuplicateDocIdError(f"duplicate document id {attrs['id']!r}", pos)
        seen_ids.add(attrs["id"])
        if pos > cursor:
            segments.append(Segment("decoder", text[cursor:pos], cursor))
        open_doc, cursor = (pos, tag.end(), attrs), tag.end()
    if open_doc is not None:
        raise UnclosedDocError("<doc> is never closed", open_doc[0])
    if cursor < len(text):
        segments.append(Segment("decoder", text[cursor:], cursor))
    return segments


class RefragTokenizer:
    """Pairs an encoder tokenizer (documents) with a decoder tokenizer (everything else)."""

    def __init__(
        self,
        *,
        encoder_tokenizer: PreTrainedTokenizerBase,
        decoder_tokenizer: PreTrainedTokenizerBase,
        compression: int = 16,
        add_bos: bool = True,
        encoder_special_tokens: bool = True,
        max_text_chars: int | None = 1_000_000,
        max_chunk_rows: int | None = 16_384,
    ):
        if compression < 1:
            raise ValueError(f"compression must be >= 1, got {compression}")
        self.max_text_chars = max_text_chars  # caps on what one text may cost (None: no cap)
        self.max_chunk_rows = max_chunk_rows
        self.encoder_tokenizer = encoder_tokenizer
        self.decoder_tokenizer = decoder_tokenizer
        self.compression = compression
        self.add_bos = add_bos
        self.encoder_special_tokens = encoder_special_tokens

    # -- special tokens -------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        return self.decoder_tokenizer.bos_token_id if self.add_bos else None

    @property
    def decoder_pad_token_id(self) -> int:
        tok = self.decoder_tokenizer
        return next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)

    @property
    def encoder_pad_token_id(self) -> int:
        pad = self.encoder_tokenizer.pad_token_id
        return 0 if pad is None else pad

    @property
    def chunk_width(self) -> int:
        """Width of the rows the encoder reads: ``k``, plus CLS and SEP where used."""
        return self.compression + 2 * self._wrap_chunks

    @property
    def _wrap_chunks(self) -> bool:
        tok = self.encoder_tokenizer
        return (
            self.encoder_special_tokens
            and tok.cls_token_id is not None
            and tok.sep_token_id is not None
        )

    # -- seed surface ---------------------------------------------------------------------
    def parse_segments(self, text: str) -> list[Segment]:
        return parse_segments(text)

    def parse_and_tokenize(self, text: str) -> list[Segment]:
        """Parse ``text`` and tokenize each segment; documents are packed into rows of k.

        Document text is data: special-token strings in it (``[SEP]``) are split into plain
        tokens. A document without tokens adds no chunk (:class:`EmptyDocumentWarning`).
        Raises :class:`TextTooLargeError` past ``max_text_chars`` or ``max_chunk_rows``.
        """
        check_text(text)
        if self.max_text_chars is not None and len(text) > self.max_text_chars:
            raise TextTooLargeError(
                f"text of {len(text):,} characters is over the cap of {self.max_text_chars:,} "
                "(max_text_chars)"
            )
        segments = parse_segments(text)
        rows = 0
        for seg in segments:
            if seg.type == "decoder":
                seg.tokens = self._ids(self.decoder_tokenizer, seg.raw_text)
                continue
            seg.tokens = self._ids(self.encoder_tokenizer, seg.raw_text, data=True)
            if not seg.tokens:
                warnings.warn(
                    f"document {seg.meta['id']!r} at position {seg.start} is empty (no encoder "
                    "token): it adds no chunk",
                    EmptyDocumentWarning,
                    stacklevel=2,
                )
            seg.packed_tokens, seg.attention_mask = self.pack(seg.tokens)
            rows += len(seg.packed_tokens)
            if self.max_chunk_rows is not None and rows > self.max_chunk_rows:
                raise TextTooLargeError(
                    f"documents up to {seg.meta['id']!r} make {rows:,} chunk rows, over the cap "
                    f"of {self.max_chunk_rows:,} (max_chunk_rows)"
                )
        return segments

    def pack(self, ids: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        """Cut ``ids`` into rows of width k; the last row is padded and masked."""
        k, pad = self.compression, self.encoder_pad_token_id
        rows, masks = [], []
        for i in range(0, len(ids), k):
            row = ids[i : i + k]
            rows.append(row + [pad] * (k - len(row)))
            masks.append([1] * len(row) + [0] * (k - len(row)))
        return rows, masks

    # -- batches for the model ------------------------------------------------------------
    def encode(self, text: str) -> dict[str, list]:
        """One text → decoder ids with a placeholder per chunk, the chunk mask and chunk rows."""
        parts = [
            ("text", seg.tokens) if seg.type == "decoder" else ("chunks", seg.tokens)
            for seg in self.parse_and_tokenize(text)
        ]
        return self.encode_parts(parts)

    def encode_parts(self, parts: list[tuple[str, list[int]]]) -> dict[str, list]:
        """Build one sequence from already-tokenized parts, after BOS:

        ``("text", decoder_ids)`` (labelled), ``("prompt", decoder_ids)`` (not labelled), or
        ``("chunks", encoder_ids)`` (packed into rows of k, one placeholder position each).
        """
        ids: list[int] = [] if self.bos_token_id is None else [self.bos_token_id]
        chunk_mask, label_mask = [False] * len(ids), [False] * len(ids)
        rows: list[tuple[list[int], list[int]]] = []
        for kind, tokens in parts:
            if kind == "chunks":
                packed, masks = self.pack(tokens)
                rows += [self._chunk_row(row, mask) for row, mask in zip(packed, masks)]
                ids += [self.decoder_pad_token_id] * len(packed)
                chunk_mask += [True] * len(packed)
                label_mask += [False] * len(packed)
            elif kind in ("text", "prompt"):
                ids += tokens
                chunk_mask += [False] * len(tokens)
                label_mask += [kind == "text"] * len(tokens)
            else:
                raise ValueError(f"unknown part kind {kind!r}")
        return {
            "input_ids": ids,
            "chunk_mask": chunk_mask,
            "label_mask": label_mask,
            "chunk_rows": rows,
        }

    def __call__(
        self,
        texts: str | list[str],
        *,
        padding_side: Literal["left", "right"] = "right",
    ) -> BatchEncoding:
        """Texts → padded tensors (see :meth:`pad`)."""
        if isinstance(texts, str):
            texts = [texts]
        return self.pad([self.encode(t) for t in texts], padding_side=padding_side)

    def pad(
        self, encoded: list[dict[str, list]], *, padding_side: Literal["left", "right"] = "right"
    ) -> BatchEncoding:
        """Pad encoded sequences into tensors.

        Returns ``input_ids``, ``attention_mask``, ``labels`` (decoder text only; chunk and pad
        positions are ``-100``), ``chunk_mask`` (True where a chunk embedding goes), and the
        chunk rows of the whole batch in the order of ``chunk_mask``'s True entries
        (row-major): ``chunk_input_ids`` and ``chunk_attention_mask``, each ``(N, chunk_width)``.
        """
        length = max(len(e["input_ids"]) for e in encoded)
        fill = {
            "input_ids": self.decoder_pad_token_id,
            "attention_mask": 0,
            "labels": IGNORE_INDEX,
            "chunk_mask": False,
        }
        cols: dict[str, list] = {k: [] for k in fill}
        for e in encoded:
            n = len(e["input_ids"])
            values = {
                "input_ids": e["input_ids"],
                "attention_mask": [1] * n,
                "labels": [
                    i if keep else IGNORE_INDEX for i, keep in zip(e["input_ids"], e["label_mask"])
                ],
                "chunk_mask": e["chunk_mask"],
            }
            for key, seq in values.items():
                padding = [fill[key]] * (length - n)
                cols[key].append(padding + seq if padding_side == "left" else seq + padding)
        data = {
            k: torch.tensor(v, dtype=torch.bool if k == "chunk_mask" else torch.long)
            for k, v in cols.items()
        }
        rows = [r for e in encoded for r in e["chunk_rows"]]
        for i, key in enumerate(("chunk_input_ids", "chunk_attention_mask")):
            data[key] = torch.tensor([r[i] for r in rows], dtype=torch.long).reshape(
                -1, self.chunk_width
            )
        return BatchEncoding(data)

    def decode(self, ids, **kwargs) -> str:
        return self.decoder_tokenizer.decode(ids, **kwargs)

    def _chunk_row(self, row: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
        if not self._wrap_chunks:
            return row, mask
        m = sum(mask)
        tok = self.encoder_tokenizer
        ids = [tok.cls_token_id, *row[:m], tok.sep_token_id]
        pad = self.chunk_width - len(ids)
        return ids + [self.encoder_pad_token_id] * pad, [1] * len(ids) + [0] * pad

    @staticmethod
    def _ids(tokenizer: PreTrainedTokenizerBase, text: str, data: bool = False) -> list[int]:
        if not text:
            return []
        return tokenizer(text, add_special_tokens=False, split_special_tokens=data)["input_ids"]

    # -- persistence ----------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.encoder_tokenizer.save_pretrained(path / "encoder_tokenizer")
        self.decoder_tokenizer.save_pretrained(path / "decoder_tokenizer")
        settings = {
            "compression": self.compression,
            "add_bos": self.add_bos,
            "encoder_special_tokens": self.encoder_special_tokens,
        }
        (path / "refrag_tokenizer.json").write_text(json.dumps(settings, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> RefragTokenizer:
        """Load a tokenizer pair written by :meth:`save_pretrained` (a checkpoint folder)."""
        path = Path(path)
        settings = json.loads((path / "refrag_tokenizer.json").read_text()) | overrides
        return cls(
            encoder_tokenizer=load_tokenizer(path / "encoder_tokenizer"),
            decoder_tokenizer=load_tokenizer(path / "decoder_tokenizer"),
            **settings,
        )

    @classmethod
    def from_encoder_decoder_pretrained(
        cls,
        *,
        encoder_name_or_path: str | Path,
        decoder_name_or_path: str | Path,
        compression: int = 16,
        **kwargs: Any,
    ) -> RefragTokenizer:
        """Pair two tokenizers, each named by a model spec (``hf:…``, ``embedded:…``, see
        :mod:`refrag.io.models`) or by anything ``AutoTokenizer.from_pretrained`` accepts (a hub
        name, a model folder, a folder holding only tokenizer files)."""
        return cls(
            encoder_tokenizer=load_tokenizer(source(str(encoder_name_or_path))),
            decoder_tokenizer=load_tokenizer(source(str(decoder_name_or_path))),
            compression=compression,
            **kwargs,
        )


def load_tokenizer(name_or_path: str | Path, **kwargs: Any) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` that never runs code: a folder is checked first
    (:func:`~refrag.io.integrity.refuse_code`) and remote code is refused, stated."""
    refuse_code(name_or_path)
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False, **kwargs)
