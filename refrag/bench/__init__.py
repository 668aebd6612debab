"""Benchmarks: time to first token against the fastest plain decoder, on real models or
random weights of named shapes. May import refrag.serve, refrag.modeling and refrag.io."""
