"""Random-weight models of named shapes (LLaMA-2-7B, RoBERTa-large, the defaults, tiny), so a
benchmark needs no download: ``NAME[:key=value,…]``."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from refrag.io.models import resolve_model
from refrag.modeling import RefragConfig, RefragModel
from refrag.modeling.modeling_refrag import load_pretrained

DECODER_SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        rms_norm_eps=1e-5,
    ),
    "llama2-13b": dict(
        model_type="llama",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        rms_norm_eps=1e-5,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}


ENCODER_SHAPES: dict[str, dict[str, Any]] = {
    "roberta-large": dict(
        model_type="roberta",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        vocab_size=50265,
        max_position_embeddings=514,
        pad_token_id=1,
    ),
    "roberta-base": dict(
        model_type="roberta",
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        vocab_size=50265,
        max_position_embeddings=514,
        pad_token_id=1,
    ),
    "minilm-l6": dict(
        model_type="bert",
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=12,
        vocab_size=30522,
    ),
    "tiny": dict(
        model_type="bert",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=512,
    ),
}


class ShapeError(ValueError):
    """A ``NAME[:key=value,…]`` shape that names no known shape."""


def shape_config(spec: str, shapes: dict[str, dict[str, Any]], min_positions: int = 0):
    """``NAME[:key=value,…]`` → a config of that shape (values parsed as JSON where they can)."""
    name, _, overrides = spec.partition(":")
    if name not in shapes:
        raise ShapeError(f"unknown shape {name!r}; known: {', '.join(shapes)}")
    values = dict(shapes[name])
    for item in filter(None, overrides.split(",")):
        key, _, raw = item.partition("=")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    if values["model_type"] == "llama":
        values.setdefault("max_position_embeddings", max(4096, min_positions))
    return AutoConfig.for_model(values.pop("model_type"), **values)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> RefragModel:
    """Encoder + random projector + decoder, from specs or from random-weight shapes."""
    if not (args.decoder_shape or args.encoder_shape):
        model = RefragModel.from_encoder_decoder_pretrained(
            encoder_name_or_path=str(resolve_model(args.encoder, args.cache_dir)),
            decoder_name_or_path=str(resolve_model(args.decoder, args.cache_dir)),
            dtype=dtype,
            attn_implementation=args.attn,
            compression=max(args.k),
        )
        return model.to(device).eval()
    kw = {"dtype": dtype, "attn_implementation": args.attn}
    longest = max(args.contexts) + args.question_tokens + args.new_tokens + 2
    with torch.device(device):
        if args.decoder_shape:
            decoder = AutoModelForCausalLM.from_config(
                shape_config(args.decoder_shape, DECODER_SHAPES, longest), **kw
            )
        else:
            decoder = load_pretrained(
                AutoModelForCausalLM, resolve_model(args.decoder, args.cache_dir), **kw
            )
        if args.encoder_shape:
            encoder = AutoModel.from_config(shape_config(args.encoder_shape, ENCODER_SHAPES), **kw)
        else:
            encoder = load_pretrained(AutoModel, resolve_model(args.encoder, args.cache_dir), **kw)
    config = RefragConfig(encoder=encoder.config, decoder=decoder.config, compression=max(args.k))
    return (
        RefragModel(config, encoder=encoder, decoder=decoder).to(device=device, dtype=dtype).eval()
    )
