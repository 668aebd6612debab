"""The REFRAG model: a chunk encoder, a projector and a causal decoder.

Each row of ``k`` context tokens is encoded once; its pooled state (the first position's, or
the mean or last of its tokens: ``config.chunk_pooling``) is projected into the decoder's
token-embedding space and takes the place of the ``k`` tokens in the
decoder's input. Forward is one encoder pass over all chunk rows of the batch, one placement
(:func:`place_chunks`) into the decoder's input embeddings, and one decoder pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

from refrag.io.integrity import refuse_code
from refrag.modeling.configuration_refrag import RefragConfig
from refrag.modeling.policy import ChunkPolicy

IGNORE_INDEX = -100


def load_pretrained(auto_class, name_or_path, **kwargs) -> PreTrainedModel:
    """``auto_class.from_pretrained`` (``AutoModel``, ``AutoModelForCausalLM`` …) that never runs
    code: a folder is checked first (:func:`~refrag.io.integrity.refuse_code`), and remote code
    is refused, stated."""
    refuse_code(name_or_path)
    return auto_class.from_pretrained(name_or_path, trust_remote_code=False, **kwargs)


def attn_implementations(module: nn.Module) -> set[str | None]:
    """The attention implementations the layers of ``module`` dispatch on (read from the
    config object each layer holds, which is what the attention forward reads)."""
    return {
        m.config._attn_implementation
        for m in module.modules()
        if "Attention" in type(m).__name__ and hasattr(getattr(m, "config", None), "model_type")
    }


def default_pooling(encoder_config: PretrainedConfig) -> str:
    """``"first"`` for an encoder that reads bidirectionally (one with a masked-LM head, whose
    first position is a [CLS] that sees the whole row), ``"mean"`` for a causal one (a decoder's
    lower layers: its first position has read one token)."""
    masked = type(encoder_config) in MODEL_FOR_MASKED_LM_MAPPING
    return "first" if masked or getattr(encoder_config, "is_encoder_decoder", False) else "mean"


def pool_chunks(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(N, W, H)`` encoder states of chunk rows (``mask`` ``(N, W)``: their real tokens,
    right-padded) → ``(N, H)`` by ``pooling`` (first, mean or last real token)."""
    if pooling == "first":
        return states[:, 0]
    mask = mask.to(states.dtype)
    if pooling == "mean":
        return (states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    last = (mask.sum(1).long() - 1).clamp(min=0)
    return states[torch.arange(states.shape[0], device=states.device), last]


def place_chunks(
    embeds: torch.Tensor, chunk_mask: torch.Tensor, chunks: torch.Tensor
) -> torch.Tensor:
    """``embeds`` ``(B, L, H)`` with the rows of ``chunks`` ``(N, H)`` at the True positions of
    ``chunk_mask`` ``(B, L)``, in row-major order (``masked_scatter``'s result). A gather and a
    ``where``: no read from the device forward or backward (``masked_scatter``'s backward
    reads the mask's count), so a compiled step stays one graph."""
    if chunks.shape[0] == 0:
        return embeds
    order = (chunk_mask.reshape(-1).cumsum(0) - 1).clamp(min=0).reshape(chunk_mask.shape)
    return torch.where(chunk_mask.unsqueeze(-1), chunks[order], embeds)


@dataclass
class ChunkEmbeddingOutput(ModelOutput):
    """``forward(..., chunk_embeds_only=True)``: projected chunk embeddings ``(N, hidden)`` and
    the decoder's token-embedding table, detached (read inside forward, where a sharded
    model's parameters are whole)."""

    chunk_embeds: torch.Tensor | None = None
    token_embeddings: torch.Tensor | None = None


class RefragProjector(nn.Module):
    """Two-layer MLP from the encoder's hidden size to the decoder's embedding size."""

    def __init__(self, config: RefragConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.encoder.hidden_size, config.projector_hidden_size)
        self.act = ACT2FN[config.projector_activation]
        self.fc2 = nn.Linear(config.projector_hidden_size, config.decoder.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden)))


def labelled_tail(labels: torch.Tensor) -> int:
    """How many final positions of a ``(B, L)`` label batch hold every label and the position
    predicting the first one: ``L`` minus the earliest labelled index, plus one (at most L)."""
    length = labels.shape[1]
    if length == 0:
        return 0
    if torch.compiler.is_compiling():  # no read from the device inside a compiled graph
        return length
    labelled = (labels != IGNORE_INDEX).any(0)
    # one read from the device (a GPU sync per forward), not two
    first = int(torch.where(labelled.any(), labelled.int().argmax(), length - 1))
    return length - max(first, 1) + 1


class RefragModel(PreTrainedModel):
    """Encoder + projector + decoder; see :class:`RefragConfig`."""

    config_class = RefragConfig
    base_model_prefix = "refrag"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    chunk_cache = None  # a refrag.serve.chunk_cache.ChunkEmbeddingCache; see use_chunk_cache

    def __init__(
        self,
        config: RefragConfig,
        encoder: PreTrainedModel | None = None,
        decoder: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.encoder = encoder if encoder is not None else AutoModel.from_config(config.encoder)
        self.decoder = (
            decoder if decoder is not None else AutoModelForCausalLM.from_config(config.decoder)
        )
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # the chunk embedding is pooled from the raw states
        # The composite config holds the sub-models' own config objects (which their layers
        # read): nothing of a given encoder/decoder changes, and a later
        # ``set_attn_implementation`` on the composite reaches the layers.
        for name in ("encoder", "decoder"):
            setattr(self.config, name, getattr(self, name).config)
        self.projector = RefragProjector(config)
        self.policy = ChunkPolicy(**config.policy) if config.policy else None
        self.post_init()
        self.set_trainable()

    def add_policy(self, **settings) -> ChunkPolicy:
        """Give the model a fresh selective-compression policy (``settings``: ChunkPolicy's
        arguments beyond its input size), recorded in the config so that it saves and loads."""
        self.config.policy = {"input_size": self.config.decoder.hidden_size, **settings}
        self.policy = ChunkPolicy(**self.config.policy).to(self.projector.fc1.weight.device)
        return self.policy

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> RefragModel:
        """``PreTrainedModel.from_pretrained`` that never runs code from the folder (checked by
        :func:`~refrag.io.integrity.refuse_code` first; remote code refused, stated)."""
        refuse_code(pretrained_model_name_or_path)
        kwargs["trust_remote_code"] = False
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_encoder_decoder_pretrained(
        cls,
        *,
        encoder_name_or_path: str,
        decoder_name_or_path: str,
        dtype: torch.dtype | str = "auto",
        attn_implementation: str | None = None,
        **config_kwargs,
    ) -> RefragModel:
        """Assemble a model from two pretrained folders; the projector starts random.

        ``attn_implementation`` (``None``: transformers' default, SDPA where supported) goes to
        both sub-models; ``config_kwargs`` (``compression``, ``chunk_pooling`` …) to
        :class:`RefragConfig`; ``chunk_pooling`` defaults to :func:`default_pooling`."""
        model_kwargs = {
            "dtype": dtype,
            "attn_implementation": attn_implementation,
        }
        encoder = load_pretrained(AutoModel, encoder_name_or_path, **model_kwargs)
        decoder = load_pretrained(AutoModelForCausalLM, decoder_name_or_path, **model_kwargs)
        config_kwargs.setdefault("chunk_pooling", default_pooling(encoder.config))
        config = RefragConfig(encoder=encoder.config, decoder=decoder.config, **config_kwargs)
        return cls(config, encoder=encoder, decoder=decoder).eval()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and any(module is m for m in self.projector.modules()):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            nn.init.zeros_(module.bias)
        elif any(module is m for m in self.encoder.modules()):
            self.encoder._init_weights(module)
        elif any(module is m for m in self.decoder.modules()):
            self.decoder._init_weights(module)

    def set_trainable(
        self,
        encoder: bool | None = None,
        projector: bool | None = None,
        decoder: bool | None = None,
    ) -> None:
        """Choose which parts train (``None`` keeps the config's choice) and record it in the config."""
        for name, flag in (("encoder", encoder), ("projector", projector), ("decoder", decoder)):
            if flag is not None:
                setattr(self.config, f"train_{name}", flag)
            getattr(self, name).requires_grad_(getattr(self.config, f"train_{name}"))

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.decoder.get_output_embeddings()

    def use_chunk_cache(self, cache=None) -> None:
        """Let ``embed_inputs`` take chunk embeddings from ``cache`` (a
        :class:`~refrag.serve.chunk_cache.ChunkEmbeddingCache`) whenever gradients are off;
        ``None`` turns it off. Training (grad enabled) always runs the encoder."""
        self.chunk_cache = cache

    def encode_chunks(
        self, chunk_input_ids: torch.Tensor, chunk_attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """All chunk rows ``(N, W)`` → projected chunk embeddings ``(N, decoder_hidden)``."""
        states = self.encoder(
            input_ids=chunk_input_ids, attention_mask=chunk_attention_mask
        ).last_hidden_state
        return self.projector(pool_chunks(states, chunk_attention_mask, self.config.chunk_pooling))

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        chunk_mask: torch.Tensor | None = None,
        chunk_input_ids: torch.Tensor | None = None,
        chunk_attention_mask: torch.Tensor | None = None,
        chunk_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder input embeddings with chunk embeddings placed where ``chunk_mask`` is True
        (in row-major order). ``chunk_embeds`` skips the encoder when given (a cache)."""
        embeds = self.decoder.get_input_embeddings()(input_ids)
        if chunk_mask is None:
            return embeds
        if chunk_embeds is None:
            if chunk_input_ids is None or chunk_input_ids.shape[0] == 0:
                return embeds
            if self.chunk_cache is not None and not torch.is_grad_enabled():
                chunk_embeds = self.chunk_cache.encode(self, chunk_input_ids, chunk_attention_mask)
            else:
                chunk_embeds = self.encode_chunks(chunk_input_ids, chunk_attention_mask)
        if not torch.compiler.is_compiling() and chunk_embeds.shape[0] != int(chunk_mask.sum()):
            raise ValueError(  # one read from the device; a compiled graph trusts the collator
                f"{chunk_embeds.shape[0]} chunk embeddings for {int(chunk_mask.sum())} chunk positions"
            )
        return place_chunks(embeds, chunk_mask, chunk_embeds.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        chunk_mask: torch.Tensor | None = None,
        chunk_input_ids: torch.Tensor | None = None,
        chunk_attention_mask: torch.Tensor | None = None,
        chunk_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        chunk_embeds_only: bool = False,
        **decoder_kwargs,
    ) -> CausalLMOutputWithPast | ChunkEmbeddingOutput:
        """Causal-LM output of the decoder over the mixed sequence; chunk positions never carry
        labels. ``decoder_kwargs`` (``past_key_values``, ``use_cache``, ``position_ids``,
        ``logits_to_keep``, ``num_items_in_batch`` …) go to the decoder unchanged.

        With ``labels`` (and no ``logits_to_keep``), logits cover only the positions from the
        one before the batch's first label on (:func:`labelled_tail`): the loss needs no
        others, and the LM head over the vocabulary is most of the cost of unlabelled prompt
        or context tokens. With ``labels`` the decoder builds no KV cache unless ``use_cache``
        says so (per layer it would copy keys and values into a cache nothing reads).

        ``chunk_embeds_only`` returns the projected chunk embeddings of ``chunk_input_ids``
        without a decoder pass (the alignment stage's forward: going through ``forward`` keeps
        DDP's gradient synchronisation)."""
        if chunk_embeds_only:
            return ChunkEmbeddingOutput(
                chunk_embeds=self.encode_chunks(chunk_input_ids, chunk_attention_mask),
                token_embeddings=self.get_input_embeddings().weight.detach(),
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(
                input_ids, chunk_mask, chunk_input_ids, chunk_attention_mask, chunk_embeds
            )
        if labels is not None and chunk_mask is not None:
            labels = labels.masked_fill(chunk_mask, IGNORE_INDEX)
        if labels is not None:  # a loss needs no KV cache (the decoder's default builds one)
            decoder_kwargs.setdefault("use_cache", False)
        if labels is not None and "logits_to_keep" not in decoder_kwargs:
            keep = labelled_tail(labels)
            labels, decoder_kwargs["logits_to_keep"] = labels[:, -keep:], keep
        return self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            labels=labels,
            **decoder_kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        chunk_mask: torch.Tensor | None = None,
        chunk_input_ids: torch.Tensor | None = None,
        chunk_attention_mask: torch.Tensor | None = None,
        chunk_embeds: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Generate from mixed input with the decoder's KV cache; returns the new tokens only.

        Batches must be left-padded. ``generate_kwargs`` go to the decoder's ``generate``.
        """
        embeds = self.embed_inputs(
            input_ids, chunk_mask, chunk_input_ids, chunk_attention_mask, chunk_embeds
        )
        if attention_mask is None:
            attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return self.decoder.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs
        )
