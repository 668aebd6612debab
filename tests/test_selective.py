import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from refrag.data.mixed import chunk_spans, context_positions, expand_count, mixed_parts
from refrag.data.shards import read_shards
from refrag.eval.perplexity import perplexity_table
from refrag.eval.scoring import result_row, score_windows, window_parts
from refrag.eval.selective import (
    chunk_embeddings,
    chunk_surprise,
    evaluate_selective,
    top_selection,
)
from refrag.modeling import ChunkPolicy, RefragModel
from refrag.train.resume import last_complete_checkpoint
from refrag.train.runner import train_stage
from refrag.train.selective import mixed_dataset, reinforce_loss, rewards, sample_selection
from refrag.train.stages import StageConfig

from .conftest import interrupt_at_step


@pytest.fixture(scope="module")
def windows(shards):
    return read_shards(shards).to_dict("records")


def test_expand_count_is_at_most_the_fraction():
    assert [expand_count(10, p) for p in (0, 0.25, 0.3, 0.5, 1)] == [0, 2, 3, 5, 10]
    assert expand_count(7, 0.3) == 2
    with pytest.raises(ValueError):
        expand_count(4, 1.5)


def test_chunk_spans_tile_the_context_at_encoder_token_ends(windows):
    row = windows[0]
    spans = chunk_spans(row, 4)
    assert len(spans) == math.ceil(len(row["context_encoder_ids"]) / 4)
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] == row["context_encoder_ends"][-1]


def test_mixed_input_reads_expanded_tokens_plus_one_position_per_compressed_chunk(
    windows, refrag_tokenizer
):
    tok, row = refrag_tokenizer, windows[1]
    spans = chunk_spans(row, tok.compression)
    expand = [0, 2, len(spans) - 1]
    example = tok.encode_parts(mixed_parts(row, tok, expand))
    expanded_tokens = sum(
        len(tok.decoder_tokenizer(row["context_text"][a:b], add_special_tokens=False)["input_ids"])
        for a, b in (spans[i] for i in expand)
    )
    compressed = len(spans) - len(expand)
    assert context_positions(example, tok) == expanded_tokens + compressed
    assert sum(example["chunk_mask"]) == compressed
    full_rows = tok.encode_parts([("chunks", list(row["context_encoder_ids"]))])["chunk_rows"]
    kept = [r for i, r in enumerate(full_rows) if i not in expand]
    assert example["chunk_rows"] == kept  # compressed chunks are the same encoder rows
    labelled = [i for i, keep in zip(example["input_ids"], example["label_mask"]) if keep]
    assert labelled == list(row["target_ids"])


def test_no_expansion_is_refrag_and_full_expansion_is_the_context_text(windows, refrag_tokenizer):
    tok, row = refrag_tokenizer, windows[2]
    none = tok.encode_parts(mixed_parts(row, tok, []))
    parts, _ = window_parts(row, "refrag", tok)
    assert none == tok.encode_parts(parts)
    everything = range(len(chunk_spans(row, tok.compression)))
    full = tok.encode_parts(mixed_parts(row, tok, everything, target=False))
    assert not any(full["chunk_mask"])
    text = tok.decoder_tokenizer.decode(full["input_ids"][1:])
    assert text == row["context_text"][: row["context_encoder_ends"][-1]]


def test_policy_masks_padded_chunks():
    torch.manual_seed(0)
    policy = ChunkPolicy(input_size=8, hidden_size=16, heads=2)
    mask = torch.tensor([[True, True, True, False, False]])
    logits = policy(torch.randn(1, 5, 8), mask)
    assert torch.isfinite(logits[0, :3]).all() and torch.isinf(logits[0, 3:]).all()


def test_sampling_picks_exactly_m_distinct_unmasked_chunks_with_their_plackett_luce_logprob():
    logits = torch.tensor([0.5, -1.0, 2.0, float("-inf"), 0.0, float("-inf")])
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        chosen, log_prob = sample_selection(logits, 3, gen)
        assert len(set(chosen)) == 3 and not {3, 5} & set(chosen)
        assert log_prob.item() < 0
    chosen, log_prob = sample_selection(logits, 10, gen)  # capped at the 4 unmasked chunks
    assert chosen == [0, 1, 2, 4]
    assert log_prob.item() <= 0
    # one draw's probability, by hand: a chunk among all, then one among the rest
    torch.manual_seed(1)
    chosen, log_prob = sample_selection(torch.tensor([1.0, 2.0]), 1)
    assert log_prob.item() == pytest.approx(F.log_softmax(torch.tensor([1.0, 2.0]), 0)[chosen[0]])


def test_reward_is_minus_the_log_perplexity_of_the_continuation(
    windows, tiny_model, refrag_tokenizer
):
    tok, row = refrag_tokenizer, windows[0]
    embeds = chunk_embeddings(tiny_model, tok, row)
    selections = [[], [0, 1], list(range(len(embeds)))]
    got = rewards(tiny_model, tok, row, selections, embeds)
    for selection, reward in zip(selections, got):
        batch = tok.pad([tok.encode_parts(mixed_parts(row, tok, selection))])
        with torch.no_grad():
            loss = tiny_model(**batch).loss  # mean NLL per target token, the encoder rerun
        assert reward.item() == pytest.approx(-loss.item(), rel=1e-4)
        assert reward.item() < 0


def test_reinforce_raises_the_probability_of_rewarded_chunks():
    torch.manual_seed(0)
    policy = ChunkPolicy(input_size=8, hidden_size=16, heads=2)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-2)
    embeds = torch.randn(6, 8)

    def reward_fn(selections):  # chunk 4 is the one worth expanding
        return torch.tensor([float(4 in s) for s in selections])

    before = policy(embeds[None])[0].softmax(-1)[4].item()
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        loss, reward = reinforce_loss(policy(embeds[None])[0], 1, reward_fn, generator=gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert policy(embeds[None])[0].softmax(-1)[4].item() > max(before, 0.5)
    assert reward.shape == (4,)


def test_equal_rewards_give_no_gradient():
    policy = ChunkPolicy(input_size=8, hidden_size=16, heads=2)
    loss, _ = reinforce_loss(policy(torch.randn(1, 5, 8))[0], 2, lambda s: torch.ones(len(s)))
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in policy.parameters())


def test_policy_stage_trains_only_the_policy_and_saves_it_with_the_model(
    shards, tiny_checkpoint, tmp_path
):
    out = tmp_path / "policy"
    hp = {"steps": 2, "batch_size": 2, "lr": 1e-3, "logging_steps": 1, "save_steps": 1}
    train_stage("policy", init=tiny_checkpoint, data=shards, out=out, compression=4, hp=hp)
    log = json.loads((out / "training_log.json").read_text())["log_history"]
    rewards_logged = [e["reward"] for e in log if "reward" in e]
    assert len(rewards_logged) == 2 and all(math.isfinite(r) and r < 0 for r in rewards_logged)
    before, after = RefragModel.from_pretrained(tiny_checkpoint), RefragModel.from_pretrained(out)
    assert after.policy is not None and after.config.policy["input_size"] == 64
    for name, value in before.state_dict().items():
        assert torch.equal(value, after.state_dict()[name]), name  # the model stayed frozen


def test_heuristic_expands_the_chunks_whose_tokens_surprise_the_decoder_most(
    windows, tiny_model, refrag_tokenizer
):
    scores = chunk_surprise(tiny_model, refrag_tokenizer, windows[0])
    assert len(scores) == len(chunk_spans(windows[0], 4)) and torch.isfinite(scores).all()
    assert top_selection(torch.tensor([0.1, 3.0, 2.0, 3.0]), 2) == [1, 3]
    assert top_selection(scores, 2) == sorted(scores.argsort(descending=True)[:2].tolist())


@pytest.mark.parametrize("selector", ["refrag_random", "refrag_heuristic", "refrag_rl"])
def test_selectors_report_log_ppl_and_positions_read(
    windows, tiny_model, refrag_tokenizer, selector
):
    policy = ChunkPolicy(tiny_model.config.decoder.hidden_size)
    rows = windows[:3]
    none = evaluate_selective(
        tiny_model, refrag_tokenizer, rows, p=0.0, selector=selector, policy=policy
    )
    half = evaluate_selective(
        tiny_model, refrag_tokenizer, rows, p=0.5, selector=selector, policy=policy
    )
    chunks = sum(len(chunk_spans(r, 4)) for r in rows) / len(rows)
    context = sum(len(r["context_ids"]) for r in rows) / len(rows)
    assert none["positions"] == chunks and none["n_tokens"] == sum(
        len(r["target_ids"]) for r in rows
    )
    assert chunks < half["positions"] < context + chunks
    assert half["compression"] == context / half["positions"]
    assert math.isfinite(half["log_ppl"]) and (half["variant"], half["p"]) == (selector, 0.5)


def test_selective_rows_score_the_tokens_every_other_row_scores(
    windows, tiny_model, refrag_tokenizer
):
    rows, group = windows[:4], {"decoder": "d", "encoder": "e", "eval_set": "test"}
    selective = evaluate_selective(
        tiny_model, refrag_tokenizer, rows, p=0.5, selector="refrag_random", k=4, **group
    )
    baselines = [
        result_row(
            score_windows(tiny_model.decoder, refrag_tokenizer, rows, variant),
            rows,
            variant=variant,
            k=None,
            stage=None,
            **group,
        )
        for variant in ("no_context", "full_context")
    ]
    assert selective["scored_digest"] == baselines[1]["scored_digest"]
    table = perplexity_table(baselines + [selective])
    row = table[table["variant"] == "refrag_random"].iloc[0]
    assert row["p"] == 0.5 and row["log_ppl_lo"] <= row["log_ppl"] <= row["log_ppl_hi"]


def test_mixed_dataset_trains_on_random_fractions(shards, refrag_tokenizer):
    hp = StageConfig(steps=3, batch_size=4, seed=1, max_expand_fraction=0.5, target_tokens=4)
    dataset, collator = mixed_dataset(shards, refrag_tokenizer, hp)
    assert len(dataset) == 12
    bos = refrag_tokenizer.bos_token_id is not None
    expanded = [  # context positions that are tokens, not chunk embeddings
        len(e["input_ids"]) - sum(e["chunk_mask"]) - sum(e["label_mask"]) - bos
        for e in dataset.examples
    ]
    assert min(expanded) >= 0 and max(expanded) > 0
    assert all(sum(e["label_mask"]) == 4 for e in dataset.examples)  # the first target tokens
    batch = collator([dataset[i] for i in range(4)])
    assert batch["chunk_input_ids"].shape[0] == int(batch["chunk_mask"].sum())


def test_an_interrupted_policy_stage_resumes_to_the_same_policy(
    shards, tiny_checkpoint, tmp_path, monkeypatch
):
    from refrag.train.selective import PolicyTrainer

    hp = {"steps": 4, "batch_size": 2, "lr": 1e-2, "save_steps": 2, "logging_steps": 1}
    run = {"init": tiny_checkpoint, "data": shards, "compression": 4, "hp": hp}
    train_stage("policy", out=tmp_path / "straight", **run)

    restore = interrupt_at_step(monkeypatch, PolicyTrainer, 3)
    with pytest.raises(KeyboardInterrupt):
        train_stage("policy", out=tmp_path / "resumed", **run)
    checkpoint = last_complete_checkpoint(tmp_path / "resumed.work")
    assert checkpoint.endswith("checkpoint-2")
    saved = load_file(Path(checkpoint) / "model.safetensors")
    assert all(name.startswith(("norm.", "proj.", "position.", "body.", "head.")) for name in saved)
    restore()
    train_stage("policy", out=tmp_path / "resumed", **run)
    straight = RefragModel.from_pretrained(tmp_path / "straight").policy.state_dict()
    resumed = RefragModel.from_pretrained(tmp_path / "resumed").policy.state_dict()
    assert all(torch.allclose(straight[k], resumed[k]) for k in straight)
