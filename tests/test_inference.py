"""Chunk-embedding cache and KV-cached generation, on a tiny random model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from unittest import mock

import pytest
import torch
from transformers import BertConfig, DynamicCache, LlamaConfig, masking_utils

from refrag.modeling import RefragConfig, RefragModel, attn_implementations
from refrag.serve.chunk_cache import ChunkEmbeddingCache, model_fingerprint
from refrag.serve.inference import decode_step, greedy_generate, prefill, stream_generate

from .attention_spy import eager_attention_calls

VOCAB, ENC_VOCAB, K = 97, 53, 4


def tiny_model(seed: int = 0) -> RefragModel:
    torch.manual_seed(seed)
    decoder = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    encoder = BertConfig(
        vocab_size=ENC_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    config = RefragConfig(encoder=encoder, decoder=decoder, compression=K)
    return RefragModel(config).eval()


@pytest.fixture(scope="module")
def model() -> RefragModel:
    return tiny_model()


def mixed_batch(
    chunks: int = 6, seed: int = 1, repeat_rows: bool = False
) -> dict[str, torch.Tensor]:
    """[BOS, 2 text tokens, `chunks` chunk positions, 5 text tokens], chunk rows of width K+2."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, VOCAB, (1, 8), generator=g)
    input_ids = torch.cat(
        [text[:, :3], torch.zeros(1, chunks, dtype=torch.long), text[:, 3:]], dim=1
    )
    input_ids[0, 0] = 1
    chunk_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    chunk_mask[0, 3 : 3 + chunks] = True
    rows = torch.randint(1, ENC_VOCAB, (chunks, K + 2), generator=g)
    mask = torch.ones_like(rows)
    mask[-1, -2:] = 0  # a short last chunk, as the tokenizer makes
    rows[-1, -2:] = 0
    if repeat_rows:
        rows[1], mask[1] = rows[0], mask[0]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "chunk_mask": chunk_mask,
        "chunk_input_ids": rows,
        "chunk_attention_mask": mask,
    }


def test_cached_and_uncached_logits_are_identical(model):
    batch = mixed_batch()
    with torch.no_grad():
        plain = model(**batch).logits
        cache = ChunkEmbeddingCache()
        model.use_chunk_cache(cache)
        try:
            first = model(**batch).logits  # fills the cache
            second = model(**batch).logits  # served from the cache
        finally:
            model.use_chunk_cache(None)
    assert cache.misses == 6 and cache.hits == 6
    assert torch.equal(plain, first)
    assert torch.equal(plain, second)


def test_repeated_chunks_are_encoded_once_and_match_the_encoder(model):
    batch = mixed_batch(repeat_rows=True)
    cache = ChunkEmbeddingCache()
    got = cache.encode(model, batch["chunk_input_ids"], batch["chunk_attention_mask"])
    with torch.no_grad():
        want = model.encode_chunks(batch["chunk_input_ids"], batch["chunk_attention_mask"])
    assert cache.misses == 5 and len(cache) == 5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_partial_hits_encode_only_new_rows(model):
    a, b = mixed_batch(seed=1), mixed_batch(seed=2)
    cache = ChunkEmbeddingCache()
    cache.encode(model, a["chunk_input_ids"], a["chunk_attention_mask"])
    rows = torch.cat([a["chunk_input_ids"][:3], b["chunk_input_ids"][:2]])
    mask = torch.cat([a["chunk_attention_mask"][:3], b["chunk_attention_mask"][:2]])
    got = cache.encode(model, rows, mask)
    assert (cache.hits, cache.misses) == (3, 8)
    with torch.no_grad():
        torch.testing.assert_close(got, model.encode_chunks(rows, mask), rtol=1e-5, atol=1e-6)


def test_cache_key_includes_the_weights():
    m1, m2 = tiny_model(seed=0), tiny_model(seed=0)
    assert model_fingerprint(m1) == model_fingerprint(m2)
    batch = mixed_batch()
    cache = ChunkEmbeddingCache()
    before = cache.encode(m1, batch["chunk_input_ids"], batch["chunk_attention_mask"])
    with torch.no_grad():
        m1.projector.fc2.bias.add_(1.0)  # an in-place update, as an optimizer step makes
    after = cache.encode(m1, batch["chunk_input_ids"], batch["chunk_attention_mask"])
    assert cache.misses == 12
    torch.testing.assert_close(after, before + 1.0, rtol=1e-5, atol=1e-5)
    assert model_fingerprint(m1) != model_fingerprint(m2)


def test_lru_bound_evicts_oldest_rows(model):
    batch = mixed_batch(chunks=6)
    cache = ChunkEmbeddingCache(max_entries=4)
    cache.encode(model, batch["chunk_input_ids"], batch["chunk_attention_mask"])
    assert len(cache) == 4
    cache.encode(model, batch["chunk_input_ids"][-4:], batch["chunk_attention_mask"][-4:])
    assert cache.hits == 4


def test_disk_tier_survives_a_new_process_cache(model, tmp_path):
    batch = mixed_batch()
    first = ChunkEmbeddingCache(disk_dir=tmp_path)
    want = first.encode(model, batch["chunk_input_ids"], batch["chunk_attention_mask"])
    first.close()
    second = ChunkEmbeddingCache(disk_dir=tmp_path)
    got = second.encode(model, batch["chunk_input_ids"], batch["chunk_attention_mask"])
    assert (second.disk_hits, second.misses) == (6, 0)
    assert torch.equal(got, want)
    second.close()


def full_recompute_greedy(model: RefragModel, batch: dict, n: int) -> torch.Tensor:
    """Greedy decoding without any KV cache: the whole sequence is re-read for every token."""
    with torch.no_grad():
        embeds = model.embed_inputs(
            batch["input_ids"],
            batch["chunk_mask"],
            batch["chunk_input_ids"],
            batch["chunk_attention_mask"],
        )
        out = []
        for _ in range(n):
            logits = model.decoder(inputs_embeds=embeds, use_cache=False).logits[:, -1]
            token = logits.argmax(-1)
            out.append(token)
            embeds = torch.cat(
                [embeds, model.decoder.get_input_embeddings()(token)[:, None]], dim=1
            )
    return torch.stack(out, dim=1)


def test_kv_cached_generation_matches_full_recomputation(model):
    batch = mixed_batch()
    want = full_recompute_greedy(model, batch, 12)
    assert torch.equal(greedy_generate(model, batch, max_new_tokens=12), want)
    hf = model.generate(
        **batch, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert torch.equal(hf, want)


def test_prefill_logits_match_forward(model):
    batch = mixed_batch()
    with torch.no_grad():
        want = model(**batch).logits[:, -1]
    state = prefill(model, **batch)
    torch.testing.assert_close(state.logits, want, rtol=1e-5, atol=1e-5)
    assert state.cache.get_seq_length() == batch["input_ids"].shape[1]


def test_stream_generate_streams_the_greedy_tokens(model):
    class ToyTokenizer:  # decoder tokenizer stand-in: one character per token id
        def decode(self, ids, **kwargs):
            return "".join(chr(65 + i % 26) + " " for i in ids)

    class ToyRefragTokenizer:
        decoder_tokenizer = ToyTokenizer()
        decoder_pad_token_id = 0

    batch = mixed_batch()
    run = stream_generate(
        model, ToyRefragTokenizer(), batch, max_new_tokens=6, do_sample=False, eos_token_id=None
    )
    text = "".join(run.pieces)
    want = full_recompute_greedy(model, batch, 6)[0].tolist()
    assert run.token_ids == want
    assert text.split() == [chr(65 + i % 26) for i in want]
    assert 0 < run.ttft_s < 60


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_loading_without_checkpoint_runs_the_requested_attention(attn, encoder_dir, decoder_dir):
    from refrag.serve.inference import load_refrag

    model, tok = load_refrag(
        decoder=str(decoder_dir), encoder=str(encoder_dir), attn_implementation=attn
    )
    assert model.decoder.config._attn_implementation == attn
    assert attn_implementations(model) == {attn}
    batch = tok("<doc id='1'>The Eiffel Tower is a lattice tower in Paris.</doc> It is in")
    with eager_attention_calls() as eager_calls:
        prefill(model, **{k: v for k, v in batch.items() if k not in ("labels", "attention_mask")})
    assert set(eager_calls) == ({"bert", "llama"} if attn == "eager" else set())


@pytest.mark.parametrize("encode", [False, True])
def test_static_runner_gives_the_dynamic_path_tokens_and_logits(model, encode):
    from refrag.serve.inference import StaticRunner, decode_step

    batch = mixed_batch()
    batch.pop("attention_mask")
    state = prefill(model, **batch)
    want_tokens, want_logits = [state.next_token], [state.logits]
    for _ in range(5):
        want_logits.append(decode_step(model, want_tokens[-1], state.cache))
        want_tokens.append(want_logits[-1].argmax(-1))
    rows, mask = batch["chunk_input_ids"], batch["chunk_attention_mask"]
    runner = StaticRunner(
        model,
        batch["input_ids"].shape[1],
        batch["chunk_mask"][0].nonzero().view(-1),
        encode=encode,
        row_width=rows.shape[1],
        max_new_tokens=8,
    )
    with torch.inference_mode():
        embeds = None if encode else model.encode_chunks(rows, mask)
    for _ in range(2):  # a second prompt through the same buffers starts from a clean cache
        got_tokens = [runner.prefill(batch["input_ids"], embeds, rows, mask).clone()]
        got_logits = [runner.logits.clone()]
        for _ in range(5):
            got_tokens.append(runner.decode().clone())
            got_logits.append(runner.logits.clone())
        assert [int(t) for t in got_tokens] == [int(t) for t in want_tokens]
        torch.testing.assert_close(
            torch.cat(got_logits), torch.cat(want_logits), rtol=1e-4, atol=1e-4
        )


@contextmanager
def sdpa_calls() -> Iterator[list[dict]]:
    """Yield a list that gains, per SDPA call, its query/key lengths, whether a mask was
    passed and ``is_causal``."""
    calls: list[dict] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, **kwargs):
        calls.append(
            {
                "q": query.shape[-2],
                "kv": key.shape[-2],
                "mask": attn_mask is not None,
                "causal": kwargs.get("is_causal", False),
            }
        )
        return original(query, key, value, attn_mask, *args, **kwargs)

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", spy):
        yield calls


@pytest.mark.parametrize("capturing", [False, True])
def test_static_runner_prefill_is_causal_over_the_prompt_only_even_under_capture(capturing):
    """Under CUDA-graph capture transformers cannot read a static cache's tensor offset, so
    a stock StaticCache prefill got a dense (T, max_len) mask (no flash kernel: the baseline's
    graph prefill at 2x its eager time). Capture is simulated on the CPU by transformers'
    own tracing check."""
    from refrag.serve.inference import StaticRunner, decode_step

    model = tiny_model()
    model.decoder.set_attn_implementation("sdpa")
    batch = mixed_batch()
    batch.pop("attention_mask")
    state = prefill(model, **batch)
    want = [state.logits, decode_step(model, state.next_token, state.cache)]
    length = batch["input_ids"].shape[1]
    runner = StaticRunner(
        model, length, batch["chunk_mask"][0].nonzero().view(-1), max_new_tokens=4
    )
    with torch.inference_mode():
        embeds = model.encode_chunks(batch["chunk_input_ids"], batch["chunk_attention_mask"])
    runner.prefill(batch["input_ids"], embeds)  # as in a capture: the buffers exist already
    tracing = mock.patch.object(masking_utils, "is_tracing", lambda *a: True)
    with ExitStack() as stack:
        if capturing:
            stack.enter_context(tracing)
        calls = stack.enter_context(sdpa_calls())
        runner.prefill(batch["input_ids"], embeds)
        got = [runner.logits.clone()]
        runner.decode()
        got.append(runner.logits.clone())
    layers = model.config.decoder.num_hidden_layers
    assert len(calls) == 2 * layers
    prompt = {"q": length, "kv": length, "mask": False, "causal": True}
    assert calls[:layers] == [prompt] * layers
    assert all(c["kv"] == length + 4 and c["mask"] for c in calls[layers:])  # static buffers
    torch.testing.assert_close(torch.cat(got), torch.cat(want), rtol=1e-4, atol=1e-4)


def test_prefill_cache_holds_the_prompt_states_without_a_copy(model):
    batch = mixed_batch()
    batch.pop("attention_mask")
    state = prefill(model, **batch)
    stock = DynamicCache(config=model.config.decoder)
    with torch.inference_mode():
        embeds = model.embed_inputs(
            batch["input_ids"],
            batch["chunk_mask"],
            batch["chunk_input_ids"],
            batch["chunk_attention_mask"],
        )
        out = model.decoder(inputs_embeds=embeds, cache=stock, use_cache=True, logits_to_keep=1)
    assert torch.equal(state.logits, out.logits[:, -1])  # the previous path's logits
    for ours, theirs in zip(state.cache.layers, stock.layers, strict=True):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    token = decode_step(model, state.next_token, state.cache).argmax(-1)
    assert state.cache.get_seq_length() == batch["input_ids"].shape[1] + 1
    assert token.shape == (1,)
