"""Shared fixtures: the real default models (fetched once by setup.sh), tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, LlamaConfig, PreTrainedTokenizerFast

from refrag.modeling import RefragConfig, RefragModel
from refrag.models import DEFAULT_DECODER, DEFAULT_ENCODER, resolve_model
from refrag.tokenization import RefragTokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def decoder_dir() -> Path:
    return resolve_model(DEFAULT_DECODER, ROOT / "resources/models")


@pytest.fixture(scope="session")
def encoder_dir() -> Path:
    return resolve_model(DEFAULT_ENCODER, ROOT / "resources/models")


@pytest.fixture(scope="session")
def decoder_tokenizer(decoder_dir):
    return AutoTokenizer.from_pretrained(decoder_dir)


@pytest.fixture(scope="session")
def encoder_tokenizer(encoder_dir):
    return AutoTokenizer.from_pretrained(encoder_dir)


@pytest.fixture(scope="session")
def llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (Metaspace, byte fallback, LLaMA's decoder), trained here on
    transformers' own LLaMA source so no hub is needed; its decode reproduces the text."""
    import transformers.models.llama.modeling_llama as source
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    tok.train_from_iterator([Path(source.__file__).read_text()], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def refrag_tokenizer(encoder_tokenizer, decoder_tokenizer) -> RefragTokenizer:
    return RefragTokenizer(encoder_tokenizer, decoder_tokenizer, compression=4)


def tiny_config(compression: int = 4, **kwargs) -> RefragConfig:
    """Random-weight REFRAG config with the default models' vocabularies (fast on CPU)."""
    encoder = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    decoder = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    return RefragConfig(encoder=encoder, decoder=decoder, compression=compression, **kwargs)


@pytest.fixture
def tiny_model() -> RefragModel:
    torch.manual_seed(0)
    return RefragModel(tiny_config()).eval()
