"""How long a chunk an encoder can read: a chunk row is k tokens plus CLS and SEP."""

from __future__ import annotations

from typing import Any

POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2}


def compression_limit(encoder_config: dict | Any) -> int | None:
    """The largest k an encoder (its config, as a dict or object) can read as one chunk row."""
    get = encoder_config.get if isinstance(encoder_config, dict) else encoder_config.__dict__.get
    positions = get("max_position_embeddings")
    if positions is None:
        return None
    return positions - POSITION_OFFSET.get(get("model_type"), 0) - 2


def check_compression(encoder_config: Any, k: int) -> None:
    """Raise ``ValueError`` naming k when chunk rows of k tokens do not fit the encoder."""
    limit = compression_limit(encoder_config)
    if limit is not None and k > limit:
        raise ValueError(
            f"k={k} does not fit the encoder: a chunk row is k + 2 tokens (CLS, SEP) and it "
            f"has positions for {limit + 2}; use k <= {limit}"
        )
