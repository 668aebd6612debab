import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModel

from refrag.modeling import RefragConfig, RefragModel, attn_implementations
from refrag.modeling.modeling_refrag import place_chunks, pool_chunks
from refrag.modeling.tokenization import IGNORE_INDEX

from .attention_spy import eager_attention_calls
from .conftest import tiny_config

TEXTS = [
    "Q: <doc id='a'>The cat sat on the mat and looked out of the window.</doc> A: the cat",
    "Hello there",
]


def test_projector_is_a_two_layer_mlp_into_the_decoder_width(tiny_model):
    proj = tiny_model.projector
    assert (proj.fc1.in_features, proj.fc1.out_features) == (32, 64)
    assert (proj.fc2.in_features, proj.fc2.out_features) == (64, 64)


def test_chunk_embeddings_land_at_chunk_positions(tiny_model, refrag_tokenizer):
    batch = refrag_tokenizer(TEXTS)
    embeds = tiny_model.embed_inputs(
        batch["input_ids"],
        batch["chunk_mask"],
        batch["chunk_input_ids"],
        batch["chunk_attention_mask"],
    )
    chunks = tiny_model.encode_chunks(batch["chunk_input_ids"], batch["chunk_attention_mask"])
    assert torch.equal(embeds[batch["chunk_mask"]], chunks)
    tokens = tiny_model.get_input_embeddings()(batch["input_ids"])
    assert torch.equal(embeds[~batch["chunk_mask"]], tokens[~batch["chunk_mask"]])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(0, 9), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_placing_chunks_is_masked_scatter_forward_and_backward(batch, length, seed, density):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=g) < density
    embeds = torch.randn(batch, length, 3, generator=g, requires_grad=True)
    chunks = torch.randn(int(mask.sum()), 3, generator=g, requires_grad=True)
    ours = place_chunks(embeds, mask, chunks)
    theirs = embeds.masked_scatter(mask.unsqueeze(-1), chunks)
    assert torch.equal(ours, theirs)
    upstream = torch.randn(ours.shape, generator=g)
    grads = [
        torch.autograd.grad(out, (embeds, chunks), upstream, materialize_grads=True)
        for out in (ours, theirs)
    ]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_the_training_forward_compiles_as_one_graph(tiny_model, refrag_tokenizer):
    """No read from the device in a labelled forward under torch.compile: one graph, no
    break (each break is a sync and a host round trip on a GPU), and the eager loss."""
    batch = dict(refrag_tokenizer(TEXTS))
    explained = torch._dynamo.explain(tiny_model)(**batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), [
        b.reason for b in explained.break_reasons
    ]
    compiled = torch.compile(tiny_model, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(**batch).loss, tiny_model(**batch).loss)


def test_encoder_runs_once_over_all_rows(tiny_model, refrag_tokenizer, monkeypatch):
    batch = refrag_tokenizer(TEXTS)
    calls = []
    tiny_model.encoder.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    tiny_model(**batch)
    assert calls == [batch["chunk_input_ids"].shape]


def test_forward_loss_ignores_chunk_positions(tiny_model, refrag_tokenizer):
    batch = refrag_tokenizer(TEXTS)
    labels = batch["input_ids"].clone()  # labels on chunk positions too: the model must drop them
    out = tiny_model(**(batch | {"labels": labels}))
    expected = tiny_model(
        **(
            batch
            | {
                "labels": labels.masked_fill(
                    batch["chunk_mask"] | (batch["attention_mask"] == 0), IGNORE_INDEX
                )
            }
        )
    )
    masked_pad = tiny_model(
        **(batch | {"labels": labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)})
    )
    assert out.logits.shape == (*batch["input_ids"].shape, 49152)
    assert torch.allclose(masked_pad.loss, expected.loss)


def test_a_labelled_forward_projects_only_the_positions_its_loss_needs(
    tiny_model, refrag_tokenizer
):
    examples = [
        refrag_tokenizer.encode_parts([("prompt", [7] * n), ("chunks", [9] * 8), ("text", [5] * 3)])
        for n in (6, 10)
    ]
    batch = refrag_tokenizer.pad(examples, padding_side="right")
    tail = tiny_model(**batch)
    every = tiny_model(**batch, logits_to_keep=0)  # 0: all positions
    first = int((batch["labels"] != IGNORE_INDEX).any(0).int().argmax())
    assert tail.logits.shape[1] == batch["input_ids"].shape[1] - first + 1
    assert every.logits.shape[1] == batch["input_ids"].shape[1]
    assert torch.allclose(tail.loss, every.loss)


def test_precomputed_chunk_embeddings_give_the_same_logits(tiny_model, refrag_tokenizer):
    batch = refrag_tokenizer(TEXTS)
    chunks = tiny_model.encode_chunks(batch["chunk_input_ids"], batch["chunk_attention_mask"])
    a = tiny_model(**batch).logits
    b = tiny_model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        chunk_mask=batch["chunk_mask"],
        chunk_embeds=chunks,
    ).logits
    assert torch.equal(a, b)


def test_wrong_number_of_chunk_embeddings_is_an_error(tiny_model, refrag_tokenizer):
    batch = refrag_tokenizer(TEXTS)
    with pytest.raises(ValueError, match="chunk embeddings for"):
        tiny_model(
            input_ids=batch["input_ids"],
            chunk_mask=batch["chunk_mask"],
            chunk_embeds=torch.zeros(1, 64),
        )


@pytest.mark.parametrize(
    ("flags", "trainable"),
    [
        ({}, {"encoder", "projector"}),
        ({"encoder": False, "decoder": True}, {"projector", "decoder"}),
        ({"projector": False, "encoder": False}, set()),
    ],
)
def test_flags_choose_which_parts_train(tiny_model, flags, trainable):
    tiny_model.set_trainable(**flags)
    parts = {
        name
        for name in ("encoder", "projector", "decoder")
        if any(p.requires_grad for p in getattr(tiny_model, name).parameters())
    }
    frozen = {
        name
        for name in ("encoder", "projector", "decoder")
        if not any(p.requires_grad for p in getattr(tiny_model, name).parameters())
    }
    assert parts == trainable and frozen.isdisjoint(trainable)
    assert {
        n for n in ("encoder", "projector", "decoder") if getattr(tiny_model.config, f"train_{n}")
    } == trainable


def test_gradients_reach_only_trainable_parts(tiny_model, refrag_tokenizer):
    tiny_model.train()
    out = tiny_model(**refrag_tokenizer(TEXTS))
    out.loss.backward()
    assert tiny_model.projector.fc1.weight.grad is not None
    assert tiny_model.encoder.embeddings.word_embeddings.weight.grad is not None
    assert all(p.grad is None for p in tiny_model.decoder.parameters())


def test_save_and_load_round_trip_through_auto_classes(tmp_path, tiny_model, refrag_tokenizer):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RefragConfig)
    again = AutoModel.from_pretrained(tmp_path)
    assert isinstance(again, RefragModel) and again.config.compression == 4
    batch = refrag_tokenizer(TEXTS)
    assert torch.equal(tiny_model(**batch).logits, again(**batch).logits)


def test_a_policy_saves_and_loads_with_the_model(tmp_path, tiny_model, refrag_tokenizer):
    assert tiny_model.policy is None
    policy = tiny_model.add_policy(hidden_size=16, heads=2)
    tiny_model.save_pretrained(tmp_path)
    again = RefragModel.from_pretrained(tmp_path)
    embeds = torch.randn(1, 5, 64)
    assert again.config.policy == {"input_size": 64, "hidden_size": 16, "heads": 2}
    assert torch.equal(policy(embeds), again.policy(embeds))
    batch = refrag_tokenizer(TEXTS)
    assert torch.equal(tiny_model(**batch).logits, again(**batch).logits)


def test_config_defaults_projector_width_to_decoder_hidden():
    config = tiny_config(compression=8)
    assert config.projector_hidden_size == 64
    again = RefragConfig.from_dict(config.to_dict())
    assert (
        again.encoder.model_type == "bert"
        and again.decoder.model_type == "llama"
        and again.compression == 8
    )
    with pytest.raises(ValueError, match="compression"):
        tiny_config(compression=0)


def test_generate_with_kv_cache_matches_greedy_recomputation(tiny_model, refrag_tokenizer):
    batch = refrag_tokenizer(TEXTS[:1])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    new = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert new.shape == (1, 6)
    embeds = tiny_model.embed_inputs(
        batch["input_ids"],
        batch["chunk_mask"],
        batch["chunk_input_ids"],
        batch["chunk_attention_mask"],
    )
    tokens = []
    with torch.no_grad():
        for _ in range(6):
            logits = tiny_model.decoder(inputs_embeds=embeds, use_cache=False).logits
            nxt = logits[0, -1].argmax()
            tokens.append(nxt.item())
            embeds = torch.cat([embeds, tiny_model.get_input_embeddings()(nxt.view(1, 1))], dim=1)
    assert new[0].tolist() == tokens


@pytest.mark.slow
def test_real_default_models_end_to_end(encoder_dir, decoder_dir):
    """The embedded MiniLM encoder + SmolLM2 decoder: tokenize a <doc>, forward, generate."""
    from refrag.modeling.tokenization import RefragTokenizer

    pair = {"encoder_name_or_path": str(encoder_dir), "decoder_name_or_path": str(decoder_dir)}
    tok = RefragTokenizer.from_encoder_decoder_pretrained(**pair, compression=16)
    model = RefragModel.from_encoder_decoder_pretrained(**pair, compression=16)
    assert not model.training
    assert (
        model.decoder.config._attn_implementation
        == model.encoder.config._attn_implementation
        == "sdpa"
    )
    text = "<doc id='1'>The Eiffel Tower is a wrought-iron lattice tower in Paris, France.</doc>\nThe Eiffel Tower is in"
    batch = tok(text)
    assert batch["chunk_mask"].sum() == batch["chunk_input_ids"].shape[0] >= 1
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss) and out.logits.shape[-1] == 49152
    new = model.generate(
        **{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=4, do_sample=False
    )
    assert new.shape == (1, 4)
    # without any chunk the model is exactly the decoder
    plain = tok("The Eiffel Tower is in")
    ref = model.decoder(input_ids=plain["input_ids"]).logits
    assert torch.allclose(model(**plain).logits, ref)


def tiny_parts(attn: str | None) -> tuple:
    """A live tiny encoder and decoder, built with ``attn`` (``None``: transformers' default)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config()
    torch.manual_seed(0)
    kw = {} if attn is None else {"attn_implementation": attn}
    encoder = AutoModel.from_config(copy.deepcopy(config.encoder), **kw)
    decoder = AutoModelForCausalLM.from_config(copy.deepcopy(config.decoder), **kw)
    return encoder, decoder


def eager_calls_of_a_forward(model: RefragModel, refrag_tokenizer) -> list[str]:
    """Run one forward; the model families whose eager attention it called."""
    with torch.no_grad(), eager_attention_calls() as calls:
        model(**refrag_tokenizer(TEXTS))
    return calls


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_building_from_live_configs_changes_nothing_in_the_given_models(attn, refrag_tokenizer):
    encoder, decoder = tiny_parts(attn)
    before = (encoder.config.to_dict(), decoder.config.to_dict())
    config = RefragConfig(encoder=encoder.config, decoder=decoder.config, compression=4)
    assert (encoder.config._attn_implementation, decoder.config._attn_implementation) == (attn,) * 2
    model = RefragModel(config, encoder=encoder, decoder=decoder).eval()
    assert (encoder.config.to_dict(), decoder.config.to_dict()) == before
    assert model.config.decoder._attn_implementation == attn
    assert attn_implementations(model.decoder) == attn_implementations(model.encoder) == {attn}
    eager_calls = eager_calls_of_a_forward(model, refrag_tokenizer)
    assert set(eager_calls) == (
        {"bert", "llama"} if attn == "eager" else set()
    )  # the kernel that ran is the one recorded


def test_models_built_from_dicts_run_sdpa(refrag_tokenizer):
    config = RefragConfig.from_dict(tiny_config().to_dict())
    model = RefragModel(config).eval()
    assert attn_implementations(model) == {"sdpa"}
    assert model.decoder.config._attn_implementation == "sdpa"
    assert eager_calls_of_a_forward(model, refrag_tokenizer) == []


@pytest.mark.parametrize("attn", [None, "sdpa", "eager"])
def test_from_pretrained_runs_the_requested_attention(attn, tmp_path, tiny_model, refrag_tokenizer):
    tiny_model.save_pretrained(tmp_path)
    kw = {} if attn is None else {"attn_implementation": attn}
    again = RefragModel.from_pretrained(tmp_path, **kw).eval()
    want = attn or "sdpa"
    assert attn_implementations(again) == {want}
    eager_calls = eager_calls_of_a_forward(again, refrag_tokenizer)
    assert set(eager_calls) == ({"bert", "llama"} if want == "eager" else set())


@pytest.mark.parametrize("attn", [None, "eager"])
def test_from_encoder_decoder_pretrained_runs_the_requested_attention(
    attn, tmp_path, refrag_tokenizer
):
    encoder, decoder = tiny_parts(None)
    encoder.save_pretrained(tmp_path / "enc")
    decoder.save_pretrained(tmp_path / "dec")
    model = RefragModel.from_encoder_decoder_pretrained(
        encoder_name_or_path=str(tmp_path / "enc"),
        decoder_name_or_path=str(tmp_path / "dec"),
        attn_implementation=attn,
        compression=4,
    )
    want = attn or "sdpa"
    assert model.decoder.config._attn_implementation == want
    assert attn_implementations(model) == {want}
    eager_calls = eager_calls_of_a_forward(model, refrag_tokenizer)
    assert set(eager_calls) == ({"bert", "llama"} if want == "eager" else set())


def test_switching_the_composite_attention_reaches_every_layer(tiny_model):
    tiny_model.set_attn_implementation("eager")
    assert attn_implementations(tiny_model) == {"eager"}
    tiny_model.set_attn_implementation("sdpa")
    assert attn_implementations(tiny_model) == {"sdpa"}


def test_labelled_tail_reads_the_device_once_and_keeps_its_value():
    from refrag.modeling.modeling_refrag import labelled_tail

    def two_reads(labels):  # the formula before: bool(any) and int(argmax)
        labelled = (labels != IGNORE_INDEX).any(0)
        first = int(labelled.int().argmax()) if bool(labelled.any()) else labels.shape[1] - 1
        return labels.shape[1] - max(first, 1) + 1

    g = torch.Generator().manual_seed(0)
    cases = [torch.full((2, 7), IGNORE_INDEX), torch.zeros(2, 7, dtype=torch.long)]
    cases += [torch.full((0, 5), IGNORE_INDEX), torch.full((3, 0), IGNORE_INDEX)]
    for _ in range(50):
        length = int(torch.randint(1, 12, (1,), generator=g))
        labels = torch.randint(0, 5, (3, length), generator=g)
        cases.append(labels.masked_fill(torch.rand(3, length, generator=g) < 0.7, IGNORE_INDEX))
    for labels in cases:
        assert labelled_tail(labels) == two_reads(labels)


def test_a_labelled_forward_builds_no_kv_cache_and_computes_the_same(refrag_tokenizer):
    torch.manual_seed(0)
    model = RefragModel(tiny_config()).eval()
    batch = refrag_tokenizer(TEXTS)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    results = []
    for kwargs in ({"use_cache": True}, {}):
        model.zero_grad()
        out = model(**batch, **kwargs)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((out, grads))
    (cached, cached_grads), (plain, grads) = results
    assert cached.past_key_values is not None and plain.past_key_values is None
    assert torch.equal(cached.loss, plain.loss) and torch.equal(cached.logits, plain.logits)
    assert all(torch.equal(a, b) for a, b in zip(cached_grads, grads, strict=True))


def test_chunk_pooling_first_mean_and_last_read_the_rows_real_tokens():
    states = torch.arange(2 * 3 * 2, dtype=torch.float).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool_chunks(states, mask, "first"), states[:, 0])
    assert torch.equal(pool_chunks(states, mask, "last"), torch.stack([states[0, 1], states[1, 2]]))
    assert torch.allclose(
        pool_chunks(states, mask, "mean"), torch.stack([states[0, :2].mean(0), states[1].mean(0)])
    )
    with pytest.raises(ValueError, match="chunk_pooling"):
        tiny_config(chunk_pooling="max")


def test_a_causal_encoder_pools_the_mean_and_saves_its_pooling(
    tmp_path, tiny_model_dirs, decoder_tokenizer
):
    """A decoder's lower layers as encoder (shared tokenizer, no CLS): mean pooling by default,
    the padding of a short chunk row changes nothing, and the choice round-trips."""
    decoder = str(tiny_model_dirs["decoder"])
    model = RefragModel.from_encoder_decoder_pretrained(
        encoder_name_or_path=decoder, decoder_name_or_path=decoder, compression=4
    )
    assert model.config.chunk_pooling == "mean"
    bert = RefragModel.from_encoder_decoder_pretrained(
        encoder_name_or_path=str(tiny_model_dirs["encoder"]), decoder_name_or_path=decoder
    )
    assert bert.config.chunk_pooling == "first"
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]])
    padded = model.encode_chunks(ids, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    alone = model.encode_chunks(ids[:1, :3], torch.ones(1, 3, dtype=torch.long))
    assert torch.allclose(padded[0], alone[0], atol=1e-5)
    assert not torch.allclose(padded[0], padded[1])
    model.save_pretrained(tmp_path)
    assert RefragModel.from_pretrained(tmp_path).config.chunk_pooling == "mean"
