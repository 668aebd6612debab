"""The vLLM engine (refrag.serve.vllm_engine) against a stand-in ``vllm`` module that records
what it is given: vLLM itself is an optional extra, never installed in CI."""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoModelForCausalLM

import refrag.serve.vllm_engine as vllm_engine
from refrag.serve.chunk_cache import ChunkEmbeddingCache

TEXT = (
    "<doc id='1'>The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in"
    " Paris, France.</doc><doc id='2'>It was designed by the company of Gustave Eiffel.</doc>"
    " Question: where is the tower? Answer:"
)


@dataclass
class FakeSamplingParams:
    temperature: float = 1.0
    max_tokens: int = 16
    detokenize: bool = True
    ignore_eos: bool = False


@dataclass
class FakeLLM:
    """Records the constructor's arguments and every prompt; answers token ids 7, 8, …"""

    kwargs: dict
    prompts: list = field(default_factory=list)
    sampling: list = field(default_factory=list)

    def __init__(self, **kwargs):
        self.kwargs, self.prompts, self.sampling = kwargs, [], []

    def generate(self, prompts, sampling_params):
        self.prompts.extend(prompts)
        self.sampling.append(sampling_params)
        answer = types.SimpleNamespace(token_ids=list(range(7, 7 + sampling_params.max_tokens)))
        return [types.SimpleNamespace(outputs=[answer]) for _ in prompts]


@pytest.fixture
def engine_module(monkeypatch):
    """refrag.serve.vllm_engine imported with the stand-in as ``vllm``; restored after."""
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    yield importlib.reload(vllm_engine)
    monkeypatch.delitem(sys.modules, "vllm")
    importlib.reload(vllm_engine)


def test_prompt_embeddings_are_the_models_own_mixed_input_embeddings(
    engine_module, tiny_model, refrag_tokenizer, tmp_path
):
    model, tok = tiny_model, refrag_tokenizer
    folder = engine_module.export_decoder(model, tok, tmp_path / "decoder")
    engine = engine_module.VllmRefragEngine(model, tok, folder, gpu_memory_utilization=0.5)
    outputs = engine.generate([TEXT, TEXT + " Paris"], max_new_tokens=3)

    llm = engine.llm
    assert llm.kwargs["model"] == str(folder) and llm.kwargs["enable_prompt_embeds"] is True
    assert llm.kwargs["dtype"] == "float32" and llm.kwargs["gpu_memory_utilization"] == 0.5
    (params,) = llm.sampling
    assert (params.temperature, params.max_tokens) == (0.0, 3)
    assert engine_module.output_token_ids(outputs) == [[7, 8, 9], [7, 8, 9]]
    for text, prompt in zip([TEXT, TEXT + " Paris"], llm.prompts, strict=True):
        batch = tok(text)
        assert int(batch["chunk_mask"].sum()) >= 2  # the passages are read compressed
        with torch.inference_mode():
            want = model.embed_inputs(
                batch["input_ids"],
                batch["chunk_mask"],
                batch["chunk_input_ids"],
                batch["chunk_attention_mask"],
            )[0]
        assert set(prompt) == {"prompt_embeds"}
        assert prompt["prompt_embeds"].shape == (batch["input_ids"].shape[1], 64)
        assert torch.equal(prompt["prompt_embeds"], want)


def test_the_chunk_cache_feeds_the_same_embeddings(engine_module, tiny_model, refrag_tokenizer):
    model, tok = tiny_model, refrag_tokenizer
    engine = engine_module.VllmRefragEngine(model, tok, "unused")
    plain = engine.embed([TEXT])[0]
    cache = ChunkEmbeddingCache()
    model.use_chunk_cache(cache)
    try:
        first, again = engine.embed([TEXT])[0], engine.embed([TEXT])[0]
    finally:
        model.use_chunk_cache(None)
    assert cache.hits > 0 and cache.misses > 0
    torch.testing.assert_close(first, plain)
    assert torch.equal(again, first)


def test_token_prompts_go_to_the_same_engine_unchanged(engine_module, tiny_model):
    engine = engine_module.VllmRefragEngine(tiny_model, None, "unused")
    engine.generate_ids([torch.tensor([1, 5, 6]), [1, 9]], max_new_tokens=2)
    assert engine.llm.kwargs["skip_tokenizer_init"] is True
    assert engine.llm.prompts == [{"prompt_token_ids": [1, 5, 6]}, {"prompt_token_ids": [1, 9]}]
    assert engine.llm.sampling[0].detokenize is False
    with pytest.raises(ValueError, match="need the tokenizer"):
        engine.embed([TEXT])


def test_the_exported_decoder_is_a_plain_folder_with_the_same_weights(tiny_model, tmp_path):
    folder = vllm_engine.export_decoder(tiny_model, None, tmp_path / "decoder")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    for name, tensor in tiny_model.decoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_without_vllm_the_engine_says_how_to_get_it(tiny_model, monkeypatch):
    monkeypatch.setattr(vllm_engine, "vllm", None)
    with pytest.raises(vllm_engine.VllmUnavailableError, match=r"pip install \.\[vllm\]"):
        vllm_engine.VllmRefragEngine(tiny_model, None, "unused")


def test_the_benchmark_feeds_both_paths_the_same_prompts(engine_module, monkeypatch, capsys):
    import runpy

    from refrag.bench import shapes, timing, vllm_compare

    importlib.reload(vllm_compare)  # bound to the reloaded engine module
    sys.modules["vllm"].__version__ = "stand-in"
    seen = []
    make_inputs = timing.make_inputs

    def recording_make_inputs(*args, **kwargs):
        seen.append(make_inputs(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(vllm_compare, "make_inputs", recording_make_inputs)
    script = runpy.run_path("benchmarks/vllm_refrag.py")
    argv = "--device cpu --dtype float32 --decoder-shape tiny --encoder-shape tiny"
    argv += " --contexts 64 --k 8,16 --prompts 2 --new-tokens 2"
    engines = []
    real_engine = vllm_compare.VllmRefragEngine

    def recording_engine(*args, **kwargs):
        engines.append(real_engine(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(vllm_compare, "VllmRefragEngine", recording_engine)
    rows = script["main"](argv.split())
    assert [(r["context"], r["k"]) for r in rows] == [(64, 8), (64, 16)]
    assert rows[0]["environment"]["vllm"] == "stand-in"
    assert rows[0]["environment"]["vllm_settings"]["enable_prefix_caching"] is False
    assert all(params.ignore_eos for params in engines[0].llm.sampling)
    (engine,) = engines
    model = engine.model
    plain = [p["prompt_token_ids"] for p in engine.llm.prompts if "prompt_token_ids" in p]
    embeds = [p["prompt_embeds"] for p in engine.llm.prompts if "prompt_embeds" in p]
    full = [x["full_ids"][0].tolist() for x in seen]
    assert all(ids in full for ids in plain) and len(set(map(tuple, plain))) == len(seen)
    with torch.inference_mode():
        want = [
            model.embed_inputs(x["ids"], x["chunk_mask"], x["rows"], x["row_mask"])[0] for x in seen
        ]
    assert all(any(e.shape == w.shape and torch.allclose(e, w) for w in want) for e in embeds)
    assert "x cached" in capsys.readouterr().out
    assert shapes.DECODER_SHAPES["tiny"]["hidden_size"] == embeds[0].shape[1]
