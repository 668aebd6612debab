"""Retrieval: passages cut from a corpus's documents, a sentence encoder and a FAISS vector
index over them (``PassageIndex``). May import refrag.modeling and refrag.io only."""

from refrag.retrieval.encoder import SentenceEncoder
from refrag.retrieval.index import Passage, PassageIndex, chunk_documents

__all__ = ["Passage", "PassageIndex", "SentenceEncoder", "chunk_documents"]
