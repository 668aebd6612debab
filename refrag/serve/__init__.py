"""Serving: inference (prefill, decode, static CUDA-graph runner), the chunk-embedding cache
and ``refrag chat``. May import refrag.modeling and refrag.io only."""
