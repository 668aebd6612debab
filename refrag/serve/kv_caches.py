"""KV caches for the prefill/decode machinery of :mod:`refrag.serve.inference`: a dynamic
cache that keeps the prompt's keys and values without copying them, and a static cache whose
prefill attends only the prompt (SDPA ``is_causal``, also under CUDA-graph capture)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer


class FirstFillLayer(DynamicLayer):
    """A :class:`DynamicLayer` that keeps the prefill's keys and values as they are: the
    stock layer ``cat``s them onto an empty tensor, two full copies of the KV states per
    layer (64 kernels and 2 x 134 MB per layer for a 16k-token 7B prefill)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.is_initialized:
            return super().update(key_states, value_states, *args, **kwargs)
        self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return self.keys, self.values


def prefill_cache(config: Any) -> DynamicCache:
    """An empty :class:`DynamicCache` for ``config`` whose full-attention layers take the
    prefill's keys and values without copying them (:class:`FirstFillLayer`)."""
    cache = DynamicCache(config=config)
    cache.layers = [FirstFillLayer() if type(x) is DynamicLayer else x for x in cache.layers]
    return cache


class RunnerLayer(StaticLayer):
    """A :class:`StaticLayer` with a prefill mode (``prefilling``, set by
    :class:`StaticRunner` around its prefill step): the prompt's keys and values are written
    to the front of the static buffers and attention reads only those ``T`` fresh ones, so the
    causal mask is SDPA's ``is_causal`` (flash kernels) rather than a dense ``T x max_len``
    boolean mask. The stock layer reports ``max_cache_len`` keys and a tensor query offset,
    which transformers cannot read under CUDA-graph capture: every captured prefill then
    built and applied a dense mask (16,448 x 16,466 for the 16k baseline: the 1,207 ms
    against 587 ms eager). Decode steps behave as the stock layer."""

    prefilling = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.prefilling:
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self.keys[:, :, :n].copy_(key_states)
        self.values[:, :, :n].copy_(value_states)
        self.cumulative_length.fill_(n)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (query_length, 0) if self.prefilling else super().get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return 0 if self.prefilling else super().get_seq_length()


def runner_cache(config: Any, max_cache_len: int) -> StaticCache:
    """A :class:`StaticCache` whose full-attention layers have the prefill mode of
    :class:`RunnerLayer` (sliding-window layers stay stock)."""
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    cache.layers = [
        RunnerLayer(max_cache_len=max_cache_len) if type(x) is StaticLayer else x
        for x in cache.layers
    ]
    return cache
