"""REFRAG: compress retrieved context into chunk embeddings that a decoder reads.

"The seed", where docstrings cite it, is the Hydra-driven repository this project grew from
(``run.py app=… env=… driver=…``); its tokenizer, token alignment, model, alignment trainer
and per-rank logs are kept here, its Hydra apps became Snakemake rules.
"""

from refrag.data.alignment import Alignment, align
from refrag.modeling import RefragConfig, RefragModel
from refrag.modeling.tokenization import RefragTokenizer, parse_segments

__version__ = "0.1.0"
__all__ = ["Alignment", "RefragConfig", "RefragModel", "RefragTokenizer", "align", "parse_segments"]
