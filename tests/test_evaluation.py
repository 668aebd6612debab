import pytest
import torch
import torch.nn.functional as F

from refrag.data import read_shards
from refrag.evaluation import context_benefit_retained, perplexity_table, target_nll


def test_target_nll_counts_only_target_tokens(shards, tiny_model, refrag_tokenizer):
    windows = read_shards(shards).to_dict("records")[:3]
    for variant in ("no_context", "full_context"):
        total, count = target_nll(
            tiny_model.decoder, refrag_tokenizer, windows, variant, batch_size=2
        )
        assert count == 3 * 8 and total > 0
    total, count = target_nll(tiny_model, refrag_tokenizer, windows, "refrag", batch_size=2)
    assert count == 3 * 8


def test_perplexity_table_computes_context_benefit_retained():
    base = {"decoder": "d", "encoder": "e", "eval_set": "test"}
    rows = [
        base | {"variant": "no_context", "k": None, "stage": None, "log_ppl": 3.0},
        base | {"variant": "full_context", "k": None, "stage": None, "log_ppl": 2.0},
        base | {"variant": "refrag", "k": 16, "stage": "cpt", "log_ppl": 2.25},
        base | {"variant": "refrag", "k": 16, "stage": "reconstruct", "log_ppl": 3.0},
    ]
    table = perplexity_table(rows, final_stage="cpt").set_index("variant")
    assert list(table.columns[:4]) == ["k", "eval_set", "log_ppl", "context_benefit_retained"]
    assert table.loc["refrag", "context_benefit_retained"] == pytest.approx(0.75)
    assert table.loc["refrag_reconstruct", "context_benefit_retained"] == pytest.approx(0.0)
    assert table.loc["full_context", "context_benefit_retained"] == pytest.approx(1.0)
    assert context_benefit_retained(1.062, 1.254, 1.069) == pytest.approx(1.038, abs=1e-3)


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
