"""REFRAG: compress retrieved context into chunk embeddings that a decoder reads."""

from refrag.alignment import Alignment, align
from refrag.modeling import RefragConfig, RefragModel
from refrag.tokenization import RefragTokenizer, parse_segments

__version__ = "0.1.0"
__all__ = ["Alignment", "RefragConfig", "RefragModel", "RefragTokenizer", "align", "parse_segments"]
