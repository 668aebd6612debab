import pytest
import torch

from refrag.data.mixed import expand_count, expanded_parts
from refrag.data.qa import QAExample, build_qa, question_prompt
from refrag.eval.qa import answer_questions
from refrag.eval.selective import top_selection
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


def policy_encoding(model, tok, text, p):
    """``text`` encoded with the policy's top ⌊p·L⌋ chunks of its one document expanded,
    chosen from the embeddings of the plain refrag encoding's chunk rows."""
    plain = tok(text)
    embeds = model.encode_chunks(plain["chunk_input_ids"], plain["chunk_attention_mask"])
    chosen = top_selection(model.policy(embeds[None])[0], expand_count(len(embeds), p))
    return tok.pad([tok.encode_parts(expanded_parts(tok, text, [chosen]))])


def full_sequence_score(model, tok, example, variant, choice, p=None):
    """The reference: the whole prompt + candidate read in one pass, no KV cache."""
    text = render_chat(
        tok.decoder_tokenizer, [{"role": "user", "content": question_prompt(example, variant)}]
    )
    batch = policy_encoding(model, tok, text, p) if variant == "refrag_rl" else tok(text)
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


def batch_of_examples() -> list[QAExample]:
    """Prompts of different lengths (a left-padded batch) and candidates of 1 to 3 tokens."""
    other = QAExample(
        "q:1",
        "q",
        "Ada Lovelace wrote the first published program, for the Engine, in 1843 in London.",
        "She wrote it in ____.",
        "1843",
        ("1843", "1791", "1871"),
    )
    plain = QAExample("r:0", "r", "A short one.", "It is ____.", "short")  # no candidates
    return [EXAMPLE, other, plain]


@pytest.mark.parametrize("variant", ["no_context", "full_context", "refrag"])
def test_candidate_scores_are_mean_token_log_likelihoods_of_the_reply(
    tiny_model, refrag_tokenizer, variant
):
    """Scored from the generation's cache of a left-padded batch, each candidate's score is
    what reading the whole prompt and candidate in one pass, alone, gives."""
    examples = batch_of_examples()
    rows = answer_questions(tiny_model, refrag_tokenizer, examples, variant, max_new_tokens=3)
    tok = template_tokenizer(refrag_tokenizer)
    with torch.no_grad():
        for example, row in zip(examples[:2], rows):
            expected = [
                full_sequence_score(tiny_model, tok, example, variant, c) for c in example.choices
            ]
            assert row["choice_scores"] == pytest.approx(expected, abs=1e-4)
    assert "choice_scores" not in rows[2]


def test_a_plain_decoder_scores_the_baselines(tiny_model, refrag_tokenizer):
    examples = batch_of_examples()
    plain = answer_questions(tiny_model.decoder, refrag_tokenizer, examples, "full_context")
    refrag = answer_questions(tiny_model, refrag_tokenizer, examples, "full_context")
    for a, b in zip(plain[:2], refrag):
        assert a["choice_scores"] == pytest.approx(b["choice_scores"], abs=1e-5)


def test_the_pick_is_the_best_candidate_and_marks_the_gold(tiny_model, refrag_tokenizer):
    examples = build_qa(multi_document_passages(), per_passage=2, choices=3)
    rows = answer_questions(tiny_model, refrag_tokenizer, examples, "refrag", max_new_tokens=2)
    for example, row in zip(examples, rows):
        if not example.choices:
            assert "choice" not in row
            continue
        best = max(range(3), key=lambda i: row["choice_scores"][i])
        assert row["choice"] == example.choices[best]
        assert row["choice_correct"] == float(example.choices[best] == example.answer)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_policy_rows_score_candidates_as_one_pass_over_the_expanded_prompt(
    tiny_model, refrag_tokenizer, p
):
    """refrag_rl: the policy's chunks of the passage read as tokens, the rest as chunk
    embeddings; scored from the cache of a left-padded batch as in one pass alone."""
    torch.manual_seed(1)
    tiny_model.add_policy(hidden_size=16, heads=2)
    examples = batch_of_examples()
    rows = answer_questions(tiny_model, refrag_tokenizer, examples, "refrag_rl", p=p)
    tok = template_tokenizer(refrag_tokenizer)
    with torch.no_grad():
        for example, row in zip(examples[:2], rows):
            expected = [
                full_sequence_score(tiny_model, tok, example, "refrag_rl", c, p)
                for c in example.choices
            ]
            assert row["choice_scores"] == pytest.approx(expected, abs=1e-4)
    assert all(row["p"] == p for row in rows)
    if p == 0.0:  # nothing expanded: the refrag reading
        refrag = answer_questions(tiny_model, refrag_tokenizer, examples, "refrag")
        for a, b in zip(rows[:2], refrag):
            assert a["choice_scores"] == pytest.approx(b["choice_scores"], abs=1e-5)
            assert a["prediction"] == b["prediction"]
