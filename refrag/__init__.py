"""REFRAG: compress retrieved context into chunk embeddings that a decoder reads.

"The seed", where docstrings cite it, is the Hydra-driven repository this project grew from
(``run.py app=… env=… driver=…``); its tokenizer, token alignment, model, alignment trainer
and per-rank logs are kept here, its Hydra apps became Snakemake rules.

The names below load on first use, so that importing one room (``refrag.modeling``,
``refrag.train.sharding``) does not pull in the others' dependencies (pandas, pyarrow):
benchmarks/gpu_check.py runs on a machine with torch and transformers alone.
"""

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "Alignment": "refrag.data.alignment",
    "align": "refrag.data.alignment",
    "RefragConfig": "refrag.modeling",
    "RefragModel": "refrag.modeling",
    "RefragTokenizer": "refrag.modeling.tokenization",
    "parse_segments": "refrag.modeling.tokenization",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'refrag' has no attribute {name!r}")
