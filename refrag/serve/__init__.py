"""Serving: inference (prefill, decode, static CUDA-graph runner), the chunk-embedding cache,
``refrag chat`` and ``refrag serve`` (batching engine, OpenAI-compatible HTTP server). May
import refrag.modeling and refrag.io only."""
