"""Data: corpora and their splits, token alignment, windows and Parquet shards, mixed
inputs, the QA set. May import refrag.modeling and refrag.io."""
