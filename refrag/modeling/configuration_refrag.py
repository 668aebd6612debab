"""Configuration of a REFRAG model: encoder, projector and decoder."""

from __future__ import annotations

import copy

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

CHUNK_POOLINGS = ("first", "mean", "last")


class RefragConfig(PreTrainedConfig):
    """Hyperparameters of :class:`~refrag.modeling.RefragModel`.

    Args:
        encoder: config of the chunk encoder (any ``AutoModel``; paper: RoBERTa-large).
        decoder: config of the causal decoder (any ``AutoModelForCausalLM``; paper: LLaMA-2-7B).
        compression: k, the number of context tokens each chunk embedding stands for.
        projector_hidden_size: hidden width of the 2-layer MLP projector; ``None`` means the
            decoder's hidden size (as in the paper).
        projector_activation: activation between the projector's two layers.
        train_encoder, train_projector, train_decoder: which parts receive gradients.
        chunk_pooling: how a chunk row's encoder states become its one vector: ``"first"``
            (the first position, a bidirectional encoder's [CLS]; the paper's), ``"mean"`` (the
            mean over the row's tokens) or ``"last"`` (its last token: what a causal encoder,
            e.g. a decoder's lower layers, has read the whole chunk at).
        policy: settings of the selective-compression policy
            (:class:`~refrag.modeling.policy.ChunkPolicy`'s arguments); ``None``: no policy.
    """

    model_type = "refrag"
    sub_configs_defaults = {
        "encoder": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "decoder": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    encoder: PreTrainedConfig | dict | None = None
    decoder: PreTrainedConfig | dict | None = None
    compression: int = 16
    projector_hidden_size: int | None = None
    projector_activation: str = "gelu"
    train_encoder: bool = True
    train_projector: bool = True
    train_decoder: bool = False
    policy: dict | None = None
    chunk_pooling: str = "first"
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # The base class resets the sub-configs' attention implementation (recursively, in
        # place): work on copies, so the configs of live models passed in are never changed,
        # and keep the implementation each one had unless one is requested for the whole.
        given = {}
        for name in ("encoder", "decoder"):
            sub = getattr(self, name)
            if isinstance(sub, PreTrainedConfig):
                given[name] = sub._attn_implementation
                setattr(self, name, copy.deepcopy(sub))
        super().__post_init__(**kwargs)
        if self._attn_implementation is None:
            for name, implementation in given.items():
                getattr(self, name)._attn_implementation = implementation
        if self.compression < 1:
            raise ValueError(f"compression must be >= 1, got {self.compression}")
        if self.chunk_pooling not in CHUNK_POOLINGS:
            raise ValueError(
                f"chunk_pooling must be one of {', '.join(CHUNK_POOLINGS)}, got {self.chunk_pooling!r}"
            )
        if self.projector_hidden_size is None:
            self.projector_hidden_size = self.decoder.hidden_size

    def get_text_config(self, *args, **kwargs) -> PreTrainedConfig:
        """Generation reads vocabulary and cache settings from the decoder."""
        return self.decoder
