import pytest
import torch

from refrag.data.qa import QAExample, build_qa, question_prompt
from refrag.eval.choice import candidate_scores, score_choices
from refrag.modeling.prompting import render_chat, template_tokenizer

from .test_qa import multi_document_passages

EXAMPLE = QAExample(
    "p:0",
    "p",
    "The Analytical Engine was designed by Charles Babbage in 1837.",
    "It was designed by ____ in 1837.",
    "Charles Babbage",
    ("Joseph Clement", "Charles Babbage", "George Scheutz"),
)


def full_sequence_score(model, tok, example, variant, choice):
    """The reference: the whole prompt + candidate read in one pass, no KV cache."""
    text = render_chat(
        tok.decoder_tokenizer, [{"role": "user", "content": question_prompt(example, variant)}]
    )
    batch = tok(text)
    ids = tok.decoder_tokenizer(choice, add_special_tokens=False)["input_ids"]
    n = batch["input_ids"].shape[1]
    full = {k: v for k, v in batch.items() if k != "labels"}
    full["input_ids"] = torch.cat([full["input_ids"], torch.tensor([ids])], 1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    if "chunk_mask" in full:
        full["chunk_mask"] = torch.cat(
            [full["chunk_mask"], torch.zeros(1, len(ids), dtype=torch.bool)], 1
        )
    logits = (
        model(**full).logits
        if hasattr(model, "embed_inputs")
        else model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits
    )
    logp = torch.log_softmax(logits[0].float(), -1)
    return float(sum(logp[n - 1 + i, t] for i, t in enumerate(ids))) / len(ids)


@pytest.mark.parametrize("variant", ["no_context", "full_context", "refrag"])
def test_candidate_scores_are_mean_token_log_likelihoods_of_the_reply(
    tiny_model, refrag_tokenizer, variant
):
    tok = template_tokenizer(refrag_tokenizer)
    with torch.no_grad():
        scores = candidate_scores(tiny_model, tok, EXAMPLE, variant)
        expected = [
            full_sequence_score(tiny_model, tok, EXAMPLE, variant, c) for c in EXAMPLE.choices
        ]
    assert scores == pytest.approx(expected, abs=1e-4)


def test_a_plain_decoder_scores_the_baselines(tiny_model, refrag_tokenizer):
    tok = template_tokenizer(refrag_tokenizer)
    with torch.no_grad():
        plain = candidate_scores(tiny_model.decoder, tok, EXAMPLE, "full_context")
        refrag = candidate_scores(tiny_model, tok, EXAMPLE, "full_context")
    assert plain == pytest.approx(refrag, abs=1e-5)


def test_score_choices_picks_the_best_candidate_and_marks_the_gold(tiny_model, refrag_tokenizer):
    examples = build_qa(multi_document_passages(), per_passage=2, choices=3)
    results = score_choices(tiny_model, refrag_tokenizer, examples, "refrag")
    for example, result in zip(examples, results):
        if not example.choices:
            assert result == {}
            continue
        best = max(range(3), key=lambda i: result["choice_scores"][i])
        assert result["choice"] == example.choices[best]
        assert result["choice_correct"] == float(example.choices[best] == example.answer)
