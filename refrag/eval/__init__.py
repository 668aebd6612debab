"""Evaluation: scoring windows, bootstrap statistics, perplexity, QA and selective
compression, and the one writer of evaluation tables. May import data, modeling, io."""
