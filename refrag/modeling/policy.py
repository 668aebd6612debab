"""The selective-compression policy: which chunks of a context to keep as tokens."""

from __future__ import annotations

import torch
from torch import nn


class ChunkPolicy(nn.Module):
    """A small transformer over a context's chunk embeddings (projected, the decoder's width):
    one logit per chunk, the higher the more worth expanding (see :mod:`refrag.eval.selective`)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int = 64,
        layers: int = 2,
        heads: int = 4,
        max_chunks: int = 2048,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(input_size)
        self.proj = nn.Linear(input_size, hidden_size)
        self.position = nn.Embedding(max_chunks, hidden_size)
        layer = nn.TransformerEncoderLayer(
            hidden_size, heads, 2 * hidden_size, dropout=0.0, batch_first=True
        )
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, chunk_embeds: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L, d)`` embeddings (``mask``: True for real chunks) → ``(B, L)`` logits,
        −inf at masked chunks."""
        if mask is None:
            mask = torch.ones(chunk_embeds.shape[:2], dtype=torch.bool, device=chunk_embeds.device)
        positions = torch.arange(chunk_embeds.shape[1], device=chunk_embeds.device)
        x = self.proj(self.norm(chunk_embeds.to(self.proj.weight.dtype))) + self.position(positions)
        x = self.body(x, src_key_padding_mask=~mask)
        return self.head(x).squeeze(-1).float().masked_fill(~mask, float("-inf"))
