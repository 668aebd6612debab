"""The REFRAG model (registered with the ``Auto`` classes as ``model_type="refrag"``), its
tokenizer, prompt rendering and chunk limits. May import refrag.io only."""

from transformers import AutoConfig, AutoModel

from refrag.modeling.configuration_refrag import RefragConfig
from refrag.modeling.modeling_refrag import RefragModel, RefragProjector, attn_implementations
from refrag.modeling.policy import ChunkPolicy

AutoConfig.register("refrag", RefragConfig, exist_ok=True)
AutoModel.register(RefragConfig, RefragModel, exist_ok=True)

__all__ = ["ChunkPolicy", "RefragConfig", "RefragModel", "RefragProjector", "attn_implementations"]
