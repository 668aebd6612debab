"""Shared fixtures: the real default models (fetched once by setup.sh) and the one tiny
random-weight REFRAG model (the default models' vocabularies, so their real tokenizers fit)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from refrag.io.integrity import write_manifest
from refrag.io.models import DEFAULT_DECODER, DEFAULT_ENCODER, resolve_model
from refrag.modeling import RefragConfig, RefragModel
from refrag.modeling.tokenization import RefragTokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "The Analytical Engine was a proposed mechanical general-purpose computer designed by "
    "English mathematician and computer pioneer Charles Babbage. It was first described in 1837 "
    "as the successor to Babbage's difference engine. The Analytical Engine incorporated an "
    "arithmetic logic unit, control flow in the form of conditional branching and loops, and "
    "integrated memory, making it the first design for a general-purpose computer. "
) * 4


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
    return RefragTokenizer(
        encoder_tokenizer=encoder_tokenizer, decoder_tokenizer=decoder_tokenizer, compression=4
    )


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


def save_tiny_model(role: str, folder: Path, tokenizer_dir: Path) -> Path:
    """A random-weight ``role`` ("encoder" or "decoder") of :func:`tiny_config`, saved as an HF
    folder with the tokenizer of ``tokenizer_dir``."""
    torch.manual_seed(0)
    cls = AutoModel if role == "encoder" else AutoModelForCausalLM
    cls.from_config(getattr(tiny_config(), role)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, encoder_dir, decoder_dir) -> dict[str, Path]:
    """Base-model folders of the tiny model, with the default models' tokenizers."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "encoder": save_tiny_model("encoder", root / "enc", encoder_dir),
        "decoder": save_tiny_model("decoder", root / "dec", decoder_dir),
    }


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, refrag_tokenizer) -> Path:
    """A REFRAG checkpoint folder of the tiny model (random projector) with its tokenizer."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-checkpoint") / "ckpt"
    RefragModel(tiny_config()).save_pretrained(path)
    refrag_tokenizer.save_pretrained(path)
    write_manifest(path)  # what training's save writes last; every load checks it
    return path


def write_text_shards(
    out: Path, docs: list[dict], tokenizers: tuple, *, context_tokens: int, **kwargs
) -> Path:
    """Shards of ``docs``'s (context_tokens + 8)-token windows, written to ``out``."""
    from refrag.data.shards import iter_windows, write_shards

    encoder_tokenizer, decoder_tokenizer = tokenizers
    rows = iter_windows(
        docs,
        encoder_tokenizer=encoder_tokenizer,
        decoder_tokenizer=decoder_tokenizer,
        context_tokens=context_tokens,
        target_tokens=8,
    )
    write_shards(list(rows), out, metadata={}, **kwargs)
    return out


@pytest.fixture(scope="session")
def shards(tmp_path_factory, encoder_tokenizer, decoder_tokenizer) -> Path:
    """A train shard folder of (32 + 8)-token windows of four short documents, 5 rows a shard."""
    docs = [{"doc_id": f"d{i}", "title": "", "text": TEXT[i * 7 :]} for i in range(4)]
    out = tmp_path_factory.mktemp("shards") / "train"
    tokenizers = (encoder_tokenizer, decoder_tokenizer)
    return write_text_shards(out, docs, tokenizers, context_tokens=32, shard_rows=5)


@pytest.fixture(scope="session")
def alignment_cache(tmp_path_factory, shards, encoder_tokenizer, decoder_tokenizer) -> Path:
    """The alignment-pair cache of :func:`shards`."""
    from refrag.data.shards import build_alignment_cache, read_shards

    out = tmp_path_factory.mktemp("alignment") / "train.parquet"
    build_alignment_cache(
        read_shards(shards),
        encoder_tokenizer=encoder_tokenizer,
        decoder_tokenizer=decoder_tokenizer,
        out=out,
    )
    return out


def interrupt_at_step(monkeypatch, trainer_cls, step: int):
    """Make ``trainer_cls`` raise KeyboardInterrupt (a killed job) when it reaches ``step``;
    returns the function that restores it (for the rerun that resumes)."""
    real_step = trainer_cls.training_step

    def failing_step(self, *args, **kwargs):
        if self.state.global_step == step:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(trainer_cls, "training_step", failing_step)
    return lambda: monkeypatch.setattr(trainer_cls, "training_step", real_step)
