import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refrag.data.shards import read_shards
from refrag.eval.perplexity import perplexity_table, same_sequences
from refrag.eval.scoring import (
    VARIANTS,
    context_benefit_retained,
    encoder_text_ids,
    score_windows,
    scored_digest,
    target_nll,
    window_parts,
)
from refrag.eval.statistics import bootstrap_ratio, tokens_to_separate
from refrag.modeling.tokenization import RefragTokenizer


def test_target_nll_counts_only_target_tokens(shards, tiny_model, refrag_tokenizer):
    windows = read_shards(shards).to_dict("records")[:3]
    for variant in ("no_context", "full_context"):
        total, count = target_nll(
            tiny_model.decoder, refrag_tokenizer, windows, variant, batch_size=2
        )
        assert count == 3 * 8 and total > 0
    total, count = target_nll(tiny_model, refrag_tokenizer, windows, "refrag", batch_size=2)
    assert count == 3 * 8


def result(variant, log_ppl, k=None, stage=None, tokens=(8, 8), digest="abc"):
    """A result row over two documents of one window each, at the given log-ppl."""
    base = {"decoder": "d", "encoder": "e", "eval_set": "test", "k": k, "stage": stage}
    windows = [
        {"doc_id": f"d{i}", "window": 0, "nll": log_ppl * n, "tokens": n, "positions": 4}
        for i, n in enumerate(tokens)
    ]
    return base | {
        "variant": variant,
        "log_ppl": log_ppl,
        "n_tokens": sum(tokens),
        "scored_digest": digest,
        "positions": 4,
        "windows": windows,
    }


def test_perplexity_table_computes_context_benefit_retained():
    rows = [
        result("no_context", 3.0),
        result("full_context", 2.0),
        result("refrag", 2.25, k=16, stage="cpt"),
        result("refrag", 3.0, k=16, stage="reconstruct"),
    ]
    table = perplexity_table(rows, final_stage="cpt").set_index("variant")
    assert list(table.columns[:8]) == [
        "k",
        "eval_set",
        "log_ppl",
        "log_ppl_lo",
        "log_ppl_hi",
        "context_benefit_retained",
        "retained_lo",
        "retained_hi",
    ]
    assert table.loc["refrag", "context_benefit_retained"] == pytest.approx(0.75)
    assert table.loc["refrag_reconstruct", "context_benefit_retained"] == pytest.approx(0.0)
    assert table.loc["full_context", "context_benefit_retained"] == pytest.approx(1.0)
    assert context_benefit_retained(1.062, 1.254, 1.069) == pytest.approx(1.038, abs=1e-3)
    # every document gives the same log-ppl: every resample does, so the interval is a point
    assert table.loc["refrag", ["log_ppl_lo", "log_ppl_hi"]].tolist() == pytest.approx([2.25] * 2)
    assert table.loc["refrag", ["retained_lo", "retained_hi"]].tolist() == pytest.approx([0.75] * 2)
    assert "windows" not in table.columns


def test_rows_that_scored_different_tokens_are_refused():
    rows = [result("no_context", 3.0, tokens=(7, 8)), result("full_context", 2.0)]
    with pytest.raises(ValueError, match="scored different target tokens.*no_context.*15 tokens"):
        perplexity_table(rows)
    rows = [result("no_context", 3.0, digest="abd"), result("full_context", 2.0)]
    with pytest.raises(ValueError, match="digest abd"):
        perplexity_table(rows)


def test_bootstrap_over_documents_matches_the_enumerated_distribution():
    """Two documents: a resample holds both once (p = 1/2), or one of them twice (1/4 each),
    so the token-weighted log-ppl is 2.2 (doc a: 1 token at 1.0; doc b: 4 tokens at 2.5),
    1.0 or 2.5, and the 95% interval runs from 1.0 to 2.5."""
    nll, tokens = np.array([[1.0, 10.0]]), np.array([[1.0, 4.0]])
    draws = bootstrap_ratio(nll, tokens, samples=4000, seed=1)[:, 0]
    values, counts = np.unique(draws.round(6), return_counts=True)
    assert values.tolist() == [1.0, 2.2, 2.5]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    assert (draws == bootstrap_ratio(nll, tokens, samples=4000, seed=1)[:, 0]).all()


def test_retained_interval_pairs_the_variants_of_one_resample():
    """Document a gives no context 3, full 2, refrag 2.5; document b 5, 1, 3: every resample
    retains between 0.5 (only a) and 0.5 (only b) of the benefit, so the paired interval is
    the point 0.5 although each log-ppl varies widely between resamples."""
    rows = []
    for variant, (a, b), k in (
        ("no_context", (3.0, 5.0), None),
        ("full_context", (2.0, 1.0), None),
        ("refrag", (2.5, 3.0), 16),
    ):
        row = result(variant, (a + b) / 2, k=k, stage="cpt" if k else None)
        row["windows"][0]["nll"], row["windows"][1]["nll"] = 8 * a, 8 * b
        rows.append(row)
    table = perplexity_table(rows, "cpt", {"samples": 500, "seed": 0}).set_index("variant")
    assert table.loc["refrag", "log_ppl_lo"] == pytest.approx(2.5)
    assert table.loc["refrag", "log_ppl_hi"] == pytest.approx(3.0)
    assert table.loc["refrag", ["retained_lo", "retained_hi"]].tolist() == pytest.approx([0.5] * 2)


def test_target_nll_matches_a_direct_computation(shards, tiny_model, refrag_tokenizer):
    windows = read_shards(shards).to_dict("records")[:2]
    total, count = target_nll(
        tiny_model.decoder, refrag_tokenizer, windows, "full_context", batch_size=2
    )
    expected = 0.0
    for row in windows:
        ids = torch.tensor(
            [[refrag_tokenizer.bos_token_id, *row["context_ids"], *row["target_ids"]]]
        )
        logits = tiny_model.decoder(input_ids=ids).logits[0, :-1]
        n = len(row["target_ids"])
        expected += F.cross_entropy(logits[-n:], ids[0, -n:], reduction="sum").item()
    assert count == 16 and total == pytest.approx(expected, rel=1e-4)


def without_start_tokens(tok, eos: bool):
    """``tok`` reading without BOS, its decoder tokenizer with (``eos``) or without an EOS."""
    decoder = copy.deepcopy(tok.decoder_tokenizer)
    if not eos:
        decoder.eos_token = None
    return RefragTokenizer(
        encoder_tokenizer=tok.encoder_tokenizer,
        decoder_tokenizer=decoder,
        compression=tok.compression,
        add_bos=False,
    )


@pytest.mark.parametrize("eos, scored", [(True, range(8)), (False, range(1, 8))])
def test_every_variant_scores_the_same_target_tokens_without_bos(
    eos, scored, shards, tiny_model, refrag_tokenizer
):
    """Without BOS the no-context row starts from EOS and scores all o tokens; without BOS or
    EOS every variant leaves the first target token unscored."""
    tok = without_start_tokens(refrag_tokenizer, eos)
    assert tok.bos_token_id is None and (tok.decoder_tokenizer.eos_token_id is not None) == eos
    windows = read_shards(shards).to_dict("records")[:3]
    for variant in VARIANTS:
        model = tiny_model if variant == "refrag" else tiny_model.decoder
        records = score_windows(model, tok, windows, variant, batch_size=2)
        assert [r["scored"] for r in records] == [list(scored)] * 3, variant
    digests = {
        scored_digest(score_windows(m, tok, windows, v), windows)
        for v, m in (("no_context", tiny_model.decoder), ("refrag", tiny_model))
    }
    assert len(digests) == 1


def test_context_positions_count_what_the_decoder_reads(shards, refrag_tokenizer):
    row = read_shards(shards).to_dict("records")[0]
    tok = refrag_tokenizer
    for variant, expected in (
        ("no_context", 0),
        ("full_context", 32),
        ("refrag", sum(tok.encode_parts(window_parts(row, "refrag", tok)[0])["chunk_mask"])),
        ("full_context_encoder_text", len(encoder_text_ids(row, tok))),
    ):
        parts, positions = window_parts(row, variant, tok)
        assert positions == expected, variant
    seen = window_parts(row, "full_context_encoder_text", tok)[0][0][1]
    # the uncased encoder gives the context back lowercased: what it can pass on
    assert tok.decode(seen) == tok.encoder_tokenizer.decode(list(row["context_encoder_ids"]))
    assert tok.decode(seen) != row["context_text"] and tok.decode(seen).islower()


def test_encoder_text_is_the_context_when_the_encoder_shares_the_decoders_tokenizer(
    shards, decoder_tokenizer
):
    """The ceiling row of a decoder-layers encoder (same tokenizer) is the full context."""
    tok = RefragTokenizer(encoder_tokenizer=decoder_tokenizer, decoder_tokenizer=decoder_tokenizer)
    row = read_shards(shards).to_dict("records")[0]
    row["context_encoder_ids"] = list(row["context_ids"])
    assert encoder_text_ids(row, tok) == list(row["context_ids"])
    # so evaluate_windows reuses full_context's scores for it; not with the uncased encoder
    assert same_sequences([row], tok, "full_context", "full_context_encoder_text")
    assert not same_sequences([row], tok, "no_context", "full_context_encoder_text")


def test_the_uncased_encoders_ceiling_row_is_scored_on_its_own(shards, refrag_tokenizer):
    rows = read_shards(shards).to_dict("records")
    assert not same_sequences(rows, refrag_tokenizer, "full_context", "full_context_encoder_text")


@pytest.mark.parametrize("variant", ["full_context_encoder_text", "refrag"])
def test_padded_batches_score_as_single_windows(variant, shards, tiny_model, refrag_tokenizer):
    """Windows of different lengths padded into one batch score as each alone."""
    windows = read_shards(shards).to_dict("records")[:4]
    for i, row in enumerate(windows):  # contexts of 1 to 4 chunks fewer
        row["context_encoder_ids"] = list(row["context_encoder_ids"])[: -4 * (i + 1)]
    model = tiny_model if variant == "refrag" else tiny_model.decoder
    alone = score_windows(model, refrag_tokenizer, windows, variant, batch_size=1)
    together = score_windows(model, refrag_tokenizer, windows, variant, batch_size=4)
    lengths = {r["positions"] for r in alone}
    assert len(lengths) > 1, "the windows should differ in length for this test"
    assert [r["nll"] for r in together] == pytest.approx([r["nll"] for r in alone], rel=1e-4)
    assert [r["scored"] for r in together] == [list(range(8))] * 4


def test_rows_without_per_window_sums_ask_for_a_rerun():
    rows = [result("no_context", 3.0), result("full_context", 2.0)]
    del rows[1]["windows"]
    with pytest.raises(ValueError, match="rerun the evaluation"):
        perplexity_table(rows)


def test_tokens_to_separate_scales_the_paired_error_to_the_gap():
    """A constant gap of 0.1 nats per token with per-document noise: separated at once when
    the documents agree; the token count grows as (error / gap)² when they do not."""
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(20)]
    base = [{"doc_id": d, "window": 0, "nll": 64 * 3.0, "tokens": 64} for d in docs]
    noisy = [w | {"nll": w["nll"] - 6.4 + rng.normal(0, 60)} for w in base]
    steady = [w | {"nll": w["nll"] - 6.4} for w in base]
    sure = tokens_to_separate({"windows": base}, {"windows": steady}, samples=200)
    assert sure["diff"] == pytest.approx(0.1) and sure["diff_lo"] == pytest.approx(0.1)
    assert sure["tokens_needed"] == sure["n_tokens"] == 1280
    unsure = tokens_to_separate({"windows": base}, {"windows": noisy}, samples=200)
    assert unsure["tokens_needed"] > unsure["n_tokens"]
    assert unsure["diff_lo"] < unsure["diff"] < unsure["diff_hi"]
