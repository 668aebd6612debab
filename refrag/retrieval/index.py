"""Passages and their vector index.

:func:`chunk_documents` cuts documents into passages of ``words`` words (consecutive, or
overlapping by ``overlap`` words), each keeping its document id and character offset.
:class:`PassageIndex` embeds them with a :class:`~refrag.retrieval.encoder.SentenceEncoder`
(the title, if any, then the text) into a FAISS ``IndexFlatIP``: exact inner product of unit
vectors, i.e. cosine similarity. ``save`` writes a folder (``index.faiss``,
``passages.parquet``, ``meta.json``, ``integrity.json`` last); ``load`` verifies it and
refuses an encoder whose weights differ from the ones that built it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import faiss
import pandas as pd

from refrag.io.integrity import (
    atomic_folder,
    sha256_file,
    verify_folder,
    write_json,
    write_manifest,
)
from refrag.retrieval.encoder import SentenceEncoder

_WORD = re.compile(r"\S+")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class Passage:
    """A passage of a document; ``score`` is its cosine similarity to the query (0 unranked)."""

    text: str
    doc_id: str
    score: float = 0.0
    passage_id: str = ""
    title: str = ""
    start: int = 0  # character offset of the passage in its document


def chunk_documents(
    documents: Iterable[Mapping], words: int = 128, overlap: int = 0
) -> list[Passage]:
    """Passages of ``words`` whitespace-separated words from each document (``doc_id``,
    ``text``, optional ``title``), the next starting ``words - overlap`` words later; a
    document's last passage may be shorter. Ids are ``<doc_id>#p<i>``."""
    if words < 1 or not 0 <= overlap < words:
        raise ValueError(
            f"passages need words >= 1 and 0 <= overlap < words (got {words}, {overlap})"
        )
    out = []
    for doc in documents:
        text, doc_id = str(doc["text"]), str(doc["doc_id"])
        spans = [m.span() for m in _WORD.finditer(text)]
        step = words - overlap
        for i, first in enumerate(range(0, max(len(spans) - overlap, 1), step)):
            part = spans[first : first + words]
            if not part:
                break
            out.append(
                Passage(
                    text=text[part[0][0] : part[-1][1]],
                    doc_id=doc_id,
                    passage_id=f"{doc_id}#p{i}",
                    title=str(doc.get("title") or ""),
                    start=part[0][0],
                )
            )
    return out


def _weights_sha256(folder: Path) -> str:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return sha256_file(folder / name)
    raise FileNotFoundError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)})")


def _embed_text(p: Passage) -> str:
    return f"{p.title}\n{p.text}" if p.title else p.text


class PassageIndex:
    """A FAISS index of passages and the sentence encoder that embeds its queries."""

    def __init__(
        self, passages: list[Passage], index: faiss.Index, encoder: SentenceEncoder, meta: dict
    ) -> None:
        if index.ntotal != len(passages):
            raise ValueError(f"index holds {index.ntotal} vectors for {len(passages)} passages")
        self.passages = passages
        self.index = index
        self.encoder = encoder
        self.meta = meta

    @classmethod
    def build(
        cls,
        passages: Iterable[Passage],
        encoder_folder: str | os.PathLike,
        *,
        batch_size: int = 32,
        device: str = "cpu",
        progress: bool = True,
        encoder: SentenceEncoder | None = None,
    ) -> PassageIndex:
        """Embed ``passages`` with the encoder of ``encoder_folder`` (or a loaded ``encoder``
        of that folder) and index them."""
        passages = [replace(p, score=0.0) for p in passages]
        if not passages:
            raise ValueError("no passages to index")
        encoder = encoder or SentenceEncoder(encoder_folder, device=device)
        vectors = encoder.encode(
            [_embed_text(p) for p in passages], batch_size=batch_size, progress=progress
        )
        index = faiss.IndexFlatIP(encoder.dim)
        index.add(vectors)
        meta = {
            "encoder": str(encoder_folder),
            "encoder_weights_sha256": _weights_sha256(Path(encoder_folder)),
            "dim": encoder.dim,
            "max_length": encoder.max_length,
            "passages": len(passages),
            "documents": len({p.doc_id for p in passages}),
            "metric": "cosine (inner product of unit vectors, exact: faiss.IndexFlatIP)",
            "pooling": "mean over the attention mask, L2-normalized",
            "faiss": faiss.__version__,
        }
        return cls(passages, index, encoder, meta)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index folder atomically (its ``integrity.json`` last)."""
        with atomic_folder(folder) as tmp:
            faiss.write_index(self.index, str(Path(tmp) / "index.faiss"))
            frame = pd.DataFrame([asdict(p) for p in self.passages]).drop(columns="score")
            frame.to_parquet(Path(tmp) / "passages.parquet", index=False)
            write_json(Path(tmp) / "meta.json", self.meta)
            write_manifest(tmp)
        return Path(folder)

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        encoder_folder: str | os.PathLike | None = None,
        *,
        device: str = "cpu",
    ) -> PassageIndex:
        """The index saved in ``folder``; its queries are embedded by ``encoder_folder`` (by
        default the folder that built it), whose weights must be the ones that built it."""
        folder = Path(folder)
        verify_folder(folder)
        meta = json.loads((folder / "meta.json").read_text())
        encoder_folder = Path(encoder_folder or meta["encoder"])
        if not encoder_folder.is_dir():
            raise FileNotFoundError(
                f"the index {folder} needs its encoder {encoder_folder}, which is missing "
                "(pass the encoder folder explicitly)"
            )
        if _weights_sha256(encoder_folder) != meta["encoder_weights_sha256"]:
            raise ValueError(
                f"encoder {encoder_folder} is not the one that built {folder} (weights differ)"
            )
        frame = pd.read_parquet(folder / "passages.parquet")
        passages = [Passage(**row) for row in frame.to_dict("records")]
        index = faiss.read_index(str(folder / "index.faiss"))
        return cls(passages, index, SentenceEncoder(encoder_folder, device=device), meta)

    def search(self, query: str, n: int) -> list[Passage]:
        """The ``n`` passages most similar to ``query``, best first, with their scores."""
        return self.search_many([query], n)[0]

    def search_many(self, queries: list[str], n: int) -> list[list[Passage]]:
        """:meth:`search` for each query, embedded in batches."""
        if n < 1:
            raise ValueError(f"n must be at least 1 (got {n})")
        vectors = self.encoder.encode(list(queries))
        scores, ids = self.index.search(vectors, min(n, len(self.passages)))
        return [
            [
                replace(self.passages[i], score=float(s))
                for s, i in zip(row_s, row_i, strict=True)
                if i >= 0
            ]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.passages)
