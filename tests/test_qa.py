import pytest
import torch

from refrag.data.qa import (
    BLANK,
    QAExample,
    answer_kind,
    answer_spans,
    build_qa,
    question_prompt,
    read_qa_set,
    split_sentences,
    write_qa_set,
)
from refrag.eval.qa import (
    answer_questions,
    cloze_answer,
    evaluate_qa,
    exact_match,
    f1_score,
    normalize_answer,
    qa_table,
)
from refrag.modeling import RefragModel
from refrag.train.runner import save_model_folder
from tests.conftest import TEXT, tiny_config

PASSAGE = (
    "cut at the window start. The Analytical Engine was designed by the English "
    "mathematician Charles Babbage in the nineteenth century. It was first described in "
    "1837 as the successor to the difference engine of its inventor. Its memory could hold "
    "1,000 numbers of 40 decimal digits each, a large store for the time. And the window "
    "ends in the middle of"
)


def test_normalization_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The  Analytical-Engine, a machine! ") == "analyticalengine machine"


@pytest.mark.parametrize(
    ("prediction", "answer", "em", "f1"),
    [
        ("Charles Babbage", "charles babbage.", 1.0, 1.0),
        ("Babbage", "Charles Babbage", 0.0, 2 * (1 * 0.5) / 1.5),
        ("the year 1837", "1837", 0.0, 2 * (0.5 * 1) / 1.5),
        ("Ada Lovelace", "Charles Babbage", 0.0, 0.0),
        ("", "1837", 0.0, 0.0),
    ],
)
def test_exact_match_and_f1_follow_squad(prediction, answer, em, f1):
    assert exact_match(prediction, answer) == em
    assert f1_score(prediction, answer) == pytest.approx(f1)


def test_answer_spans_are_names_and_numbers_never_the_sentence_start():
    sentence = "The engine was designed by Charles Babbage in 1837 for the British government."
    spans = {sentence[a:b] for a, b in answer_spans(sentence)}
    assert spans == {"Charles Babbage", "1837", "British"}


def test_questions_are_sentences_of_the_passage_with_the_answer_blanked():
    examples = build_qa([{"id": "p", "text": PASSAGE}], per_passage=10)
    assert len(examples) >= 4
    for e in examples:
        assert e.question.count(BLANK) == 1 and e.answer in e.passage
        assert e.question.replace(BLANK, e.answer) in e.passage  # a real sentence of it
        assert "window" not in e.question  # first and last sentences may be cut
    assert {"Charles Babbage", "1837", "1,000"} <= {e.answer for e in examples}


def test_qa_set_is_deterministic_by_seed_and_deduplicated():
    passages = [{"doc_id": "d", "window": w, "context_text": PASSAGE} for w in range(3)]
    first, again = build_qa(passages, seed=1), build_qa(passages, seed=1)
    assert first == again
    assert len({(e.question, e.answer) for e in first}) == len(first) == 3  # repeats dropped
    assert len(build_qa([passages[0]], seed=1)) == 1
    assert first[0] == build_qa([passages[0]], seed=1)[0]  # independent of the other passages
    others = {(e.question, e.answer) for s in range(2, 8) for e in build_qa(passages[:1], seed=s)}
    assert len(others) > 1  # the seed chooses


def scored_rows(variant, k, sft, hits, p=None):
    """Per-question rows as evaluate_qa writes them: question i of document d{i % 4}."""
    group = {"decoder": "dec", "encoder": "enc", "eval_set": "test"}
    return [
        {"id": f"d{i % 4}#{i}:0", "passage_id": f"d{i % 4}#{i}", "variant": variant, "k": k}
        | {"sft": sft, "p": p, "exact_match": float(hit), "f1": 0.5 + hit / 2}
        | group
        for i, hit in enumerate(hits)
    ]


def test_qa_table_gives_means_with_document_intervals_and_counts():
    rows = scored_rows("no_context", None, False, [0] * 20)
    rows += scored_rows("refrag", 16, False, [i % 2 for i in range(20)])
    rows += scored_rows("refrag", 16, True, [1] * 20)
    table = qa_table(rows, samples=200)
    assert list(zip(table["variant"], table["sft"])) == [
        ("no_context", False),
        ("refrag", False),
        ("refrag", True),
    ]
    half = table.iloc[1]
    assert half["exact_match"] == 0.5 and half["f1"] == 0.75 and half["k"] == 16
    assert half["exact_match_lo"] < 0.5 < half["exact_match_hi"]
    assert table.iloc[2][["exact_match_lo", "exact_match_hi"]].tolist() == [1.0, 1.0]
    assert set(table["n_questions"]) == {20} and set(table["n_documents"]) == {4}


def test_qa_table_gives_a_policy_row_per_p_after_refrag():
    rows = scored_rows("refrag_rl", 16, False, [1] * 20, p=0.5)
    rows += scored_rows("refrag_rl", 16, False, [i % 2 for i in range(20)], p=0.25)
    rows += scored_rows("refrag", 16, False, [0] * 20)
    rows += [r | {"p": float("nan")} for r in scored_rows("no_context", None, False, [0] * 20)]
    table = qa_table(rows, samples=100)
    assert list(zip(table["variant"], table["p"].fillna(-1))) == [
        ("no_context", -1),
        ("refrag", -1),
        ("refrag_rl", 0.25),
        ("refrag_rl", 0.5),
    ]
    assert table["exact_match"].tolist() == [0, 0, 0.5, 1]
    assert list(table.columns[:5]) == ["variant", "k", "sft", "p", "eval_set"]
    old = [{k: v for k, v in r.items() if k != "p"} for r in scored_rows("refrag", 8, 0, [1] * 20)]
    assert qa_table(old, samples=10)["p"].isna().all()  # rows written before p was a column


def test_qa_table_refuses_rows_that_answered_different_questions():
    rows = scored_rows("no_context", None, False, [0] * 20)
    rows += scored_rows("refrag", 16, False, [1] * 19)
    with pytest.raises(ValueError, match="different questions"):
        qa_table(rows)


def test_the_qa_set_round_trips_through_json_lines(tmp_path):
    examples = build_qa([{"id": "p", "text": PASSAGE}], per_passage=3)
    assert read_qa_set(write_qa_set(examples, tmp_path / "qa" / "set.jsonl")) == examples


def test_prompts_read_the_passage_as_nothing_tokens_or_a_doc():
    e = QAExample("p:0", "p", "Some passage.", f"It was {BLANK}.", "x")
    assert "Some passage." not in question_prompt(e, "no_context")
    assert "Some passage." in question_prompt(e, "full_context")
    assert "<doc id='p'>Some passage.</doc>" in question_prompt(e, "refrag")
    assert question_prompt(e, "refrag_rl") == question_prompt(e, "refrag")
    with pytest.raises(ValueError, match="variants"):
        question_prompt(e, "other")


@pytest.mark.parametrize("variant", ["no_context", "full_context", "refrag"])
def test_answer_questions_generates_and_scores_every_example(tiny_model, refrag_tokenizer, variant):
    examples = build_qa([{"id": f"p{i}", "text": PASSAGE + TEXT[: i * 50]} for i in range(3)])
    rows = answer_questions(tiny_model, refrag_tokenizer, examples, variant, max_new_tokens=4)
    assert [r["id"] for r in rows] == [e.id for e in examples]
    for r in rows:
        assert r["variant"] == variant and isinstance(r["prediction"], str)
        assert r["exact_match"] == exact_match(r["prediction"], r["answer"])
        assert r["f1"] == f1_score(r["prediction"], r["answer"])


def test_answer_questions_reads_the_doc_through_the_encoder(tiny_model, refrag_tokenizer):
    calls = []
    tiny_model.encoder.register_forward_hook(lambda *a: calls.append(1))
    examples = build_qa([{"id": "p", "text": PASSAGE}])
    answer_questions(tiny_model, refrag_tokenizer, examples, "full_context", max_new_tokens=2)
    assert calls == []
    answer_questions(tiny_model, refrag_tokenizer, examples, "refrag", max_new_tokens=2)
    assert calls == [1]
    assert refrag_tokenizer.add_bos  # the shared tokenizer is left as it was


def test_the_policy_variant_needs_a_policy_and_p(tiny_model, refrag_tokenizer):
    examples = build_qa([{"id": "p", "text": PASSAGE}])
    with pytest.raises(ValueError, match="chunk policy"):
        answer_questions(tiny_model, refrag_tokenizer, examples, "refrag_rl", p=0.25)
    tiny_model.add_policy(hidden_size=16, heads=2)
    with pytest.raises(ValueError, match="needs p"):
        answer_questions(tiny_model, refrag_tokenizer, examples, "refrag_rl")
    with pytest.raises(ValueError, match="RefragModel"):
        answer_questions(tiny_model.decoder, refrag_tokenizer, examples, "refrag_rl", p=0.25)
    rows = answer_questions(tiny_model, refrag_tokenizer, examples, "refrag_rl", p=0.25)
    chunks = -(-len(refrag_tokenizer.encoder_tokenizer(PASSAGE)["input_ids"][1:-1]) // 4)
    assert rows[0]["p"] == 0.25 and chunks < rows[0]["positions"]  # some chunks as tokens
    refrag = answer_questions(tiny_model, refrag_tokenizer, examples, "refrag")
    assert refrag[0]["p"] is None and "positions" not in refrag[0]


def test_a_plain_decoder_answers_the_baselines(tiny_model, refrag_tokenizer):
    examples = build_qa([{"id": "p", "text": PASSAGE}])
    torch.manual_seed(0)
    rows = answer_questions(tiny_model.decoder, refrag_tokenizer, examples, "full_context")
    assert len(rows) == 1
    with pytest.raises(ValueError, match="RefragModel"):
        answer_questions(tiny_model.decoder, refrag_tokenizer, examples, "refrag")


@pytest.mark.parametrize(
    ("generation", "answer"),
    [
        ("Charles Babbage\nmore text", "Charles Babbage"),
        ("It was designed by  Charles Babbage in 1837 for the Crown.", "Charles Babbage"),
        ("It was designed by Charles Babbage", "Charles Babbage"),
        ("It was designed by ____ in 1837.", "____"),
        ("  \nAda", "Ada"),
        ("", ""),
    ],
)
def test_cloze_answer_reads_the_words_a_restated_sentence_puts_in_the_blank(generation, answer):
    assert cloze_answer(generation, f"It was designed by {BLANK} in 1837 for the Crown.") == answer


def test_headings_are_sentences_of_their_own():
    text = "Alternative medicine\nAlthough many therapies exist, few are supported. Next one."
    assert split_sentences(text) == [
        "Alternative medicine",
        "Although many therapies exist, few are supported.",
        "Next one.",
    ]


def test_cloze_answer_stops_at_punctuation_that_follows_the_blank():
    question = f"An estimated 0.5% to {BLANK}% of individuals with ASD show unusual abilities."
    assert cloze_answer("An estimated 0.5% to 6.5% of individuals with", question) == "6.5"


OTHER = (
    "An opening sentence that a window may cut. The Difference Engine was built by Joseph "
    "Clement in London during 1832 for the British government. A later machine by George "
    "Scheutz was sold in 1855 to the Dudley Observatory of Albany. Its tables held 2,500 "
    "entries of 15 digits each, printed by the machine itself. A closing sentence that may "
    "be cut"
)


def multi_document_passages():
    return [
        {"doc_id": doc, "window": w, "context_text": text}
        for doc, text in (("a", PASSAGE), ("b", OTHER), ("c", OTHER.replace("1832", "1841")))
        for w in range(2)
    ]


def test_choices_hold_the_answer_and_same_kind_distractors():
    passages = multi_document_passages()
    examples = build_qa(passages, per_passage=3, choices=3, seed=2)
    with_choices = [e for e in examples if e.choices]
    assert with_choices
    own_document = 0
    for e in with_choices:
        assert len(e.choices) == 3 and e.answer in e.choices
        assert len({normalize_answer(c) for c in e.choices}) == 3
        document_text = " ".join(
            p["context_text"] for p in passages if p["doc_id"] == e.passage_id.split("#")[0]
        )
        for distractor in set(e.choices) - {e.answer}:
            assert distractor not in e.question  # the sentence never gives a candidate away
            own_document += distractor in document_text
            assert answer_kind(distractor).split(":")[0] == answer_kind(e.answer).split(":")[0]
    assert own_document  # the passage's own names and numbers are drawn first
    numbers = [e for e in with_choices if answer_kind(e.answer) == "number"]
    assert numbers and all(answer_kind(c) == "number" for e in numbers for c in e.choices)
    assert {e.choices.index(e.answer) for e in with_choices} != {0}  # shuffled
    assert build_qa(multi_document_passages(), per_passage=3, choices=3, seed=2) == examples


def test_distractors_come_from_the_passage_first_and_years_stay_years():
    text = (
        "Opening words of the window here. The treaty was signed in 1648 at a city of Westphalia "
        "after long talks. A war had started in 1618 in the kingdom of Bohemia with a revolt. "
        "Another peace was agreed in 1635 at the city of Prague by the parties. The army had "
        "12,000 soldiers and 300 guns at the start of the campaign. Closing words here"
    )
    other = {"id": "z#0", "text": text.replace("16", "17")}
    examples = build_qa([{"id": "a#0", "text": text}, other], per_passage=9, choices=3, seed=1)
    years = [e for e in examples if e.passage_id == "a#0" and answer_kind(e.answer) == "year"]
    assert years
    for e in years:
        assert e.choices and all(answer_kind(c) == "year" for c in e.choices)
        assert all(c in text for c in e.choices)  # the passage's own years, not the other's


def test_a_question_without_enough_distractors_gets_no_choices():
    examples = build_qa([{"id": "p", "text": PASSAGE}], per_passage=3, choices=4)
    assert examples and all(e.choices == () for e in examples)  # one document: none to draw


def test_choices_round_trip_and_old_sets_read_without_them(tmp_path):
    examples = build_qa(multi_document_passages(), per_passage=2, choices=3)
    assert read_qa_set(write_qa_set(examples, tmp_path / "set.jsonl")) == examples
    old = tmp_path / "old.jsonl"
    old.write_text(
        '{"id": "p:0", "passage_id": "p", "passage": "x", "question": "q", "answer": "a"}\n'
    )
    assert read_qa_set(old)[0].choices == ()


def test_qa_table_scores_multiple_choice_and_its_gain_over_no_context():
    def with_choices(rows, hits):
        return [r | {"choice_correct": float(h)} for r, h in zip(rows, hits)]

    rows = with_choices(
        scored_rows("no_context", None, False, [0] * 20), [i % 4 == 0 for i in range(20)]
    )
    rows += with_choices(scored_rows("full_context", None, False, [0] * 20), [1] * 20)
    rows += with_choices(scored_rows("refrag", 16, False, [0] * 20), [i % 2 for i in range(20)])
    table = qa_table(rows, samples=300).set_index("variant")
    assert table.loc["no_context", "choice_accuracy"] == 0.25
    assert table.loc["full_context", "choice_accuracy"] == 1.0
    assert table.loc["full_context", "choice_gain"] == 0.75
    assert (
        0
        < table.loc["full_context", "choice_gain_lo"]
        <= 0.75
        <= table.loc["full_context", "choice_gain_hi"]
    )
    assert (
        table.loc["no_context", "choice_gain"] == 0
        and table.loc["no_context", "choice_gain_hi"] == 0
    )
    assert table.loc["refrag", "choice_accuracy"] == 0.5
    assert set(table["n_choice_questions"]) == {20}


def test_a_policy_checkpoint_answers_once_per_fraction(tmp_path, refrag_tokenizer):
    torch.manual_seed(0)
    model = RefragModel(tiny_config())
    model.add_policy(hidden_size=16, heads=2)
    checkpoint = tmp_path / "policy"
    log = {"training_log.json": {"stage": "policy"}}
    save_model_folder(model, refrag_tokenizer, checkpoint, extra=log)
    qa = write_qa_set(build_qa([{"id": "p", "text": PASSAGE}], per_passage=2), tmp_path / "qa")
    run = {"qa_set": qa, "checkpoint": checkpoint, "variants": ["refrag_rl"], "max_new_tokens": 2}
    rows = evaluate_qa(out=tmp_path / "out.json", fractions=[0.25, 0.5], **run)
    assert [(r["variant"], r["p"], r["stage"], r["sft"]) for r in rows] == [
        ("refrag_rl", p, "policy", False) for p in (0.25, 0.25, 0.5, 0.5)
    ]
    assert rows[0]["positions"] < rows[2]["positions"]  # more chunks as tokens
    with pytest.raises(ValueError, match="fractions"):
        evaluate_qa(out=tmp_path / "none.json", **run)
