"""refrag.eval.rag: recall@n of the QA set's sources, RAG answers with TTFT per passages
read (tiny random-weight checkpoint, real sentence encoder), the tables, the plot."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from refrag.data.qa import BLANK, QAExample, write_qa_set
from refrag.eval.rag import (
    equal_latency,
    evaluate_rag,
    plot_rag,
    rag_table,
    recall_table,
    report_sections,
    retrieval_hits,
    with_passages,
)
from refrag.retrieval import PassageIndex, SentenceEncoder, chunk_documents
from tests.test_retrieval import DOCS

QUESTIONS = [
    QAExample(
        id="q1",
        passage_id="engine#0",
        passage=DOCS[0]["text"],
        question=f"The Analytical Engine was a mechanical computer designed by {BLANK}.",
        answer="Charles Babbage",
        choices=("Ada Lovelace", "Charles Babbage", "Alan Turing", "Isaac Newton"),
    ),
    QAExample(
        id="q2",
        passage_id="engine#1",
        passage=DOCS[0]["text"],
        question=f"It was first described in {BLANK} as the successor to the difference engine.",
        answer="1837",
        choices=("1837", "1901", "1765", "1999"),
    ),
    QAExample(
        id="q3",
        passage_id="volcano#0",
        passage=DOCS[1]["text"],
        question=f"A volcano lets hot lava, volcanic ash and gases escape from a {BLANK} chamber.",
        answer="magma",
        choices=("water", "magma", "gas", "steam"),
    ),
    QAExample(  # its answer is in no passage: found by document, never with the answer
        id="q4",
        passage_id="football#0",
        passage=DOCS[2]["text"],
        question=f"Association football is played by two teams in {BLANK}.",
        answer="Wembley",
        choices=("Wembley", "Paris", "Rome", "Berlin"),
    ),
]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, encoder_dir) -> str:
    index = PassageIndex.build(
        chunk_documents(DOCS, words=20),
        encoder_dir,
        encoder=SentenceEncoder(encoder_dir),
        progress=False,
    )
    return str(index.save(tmp_path_factory.mktemp("rag") / "index"))


def test_recall_counts_the_source_document_and_the_answer(index_dir):
    index = PassageIndex.load(index_dir)
    hits, rows = retrieval_hits(index, QUESTIONS, 3)
    by_id = {r["id"]: r for r in rows}
    assert by_id["q1"]["rank_document"] == 1 and by_id["q1"]["rank_answer"] == 1
    assert by_id["q3"]["rank_answer"] == 1
    assert by_id["q4"]["rank_document"] == 1 and by_id["q4"]["rank_answer"] is None
    table = recall_table(rows, [1, 3], samples=50, seed=0).set_index("n")
    assert table.loc[1, "recall_answer"] == pytest.approx(0.75)
    assert table.loc[1, "recall_document"] == pytest.approx(1.0)
    assert table.loc[1, "n_documents"] == 3
    assert table.loc[3, "recall_answer_lo"] <= 0.75 <= table.loc[3, "recall_answer_hi"]
    joined = with_passages(QUESTIONS, hits, 2)
    assert joined[0].passage == "\n\n".join(p.text for p in hits[0][:2])
    assert joined[0].passage_id == "engine#0"  # grouped by the source document still


def test_rag_evaluation_tables_and_plot(tmp_path, index_dir, tiny_checkpoint):
    qa = write_qa_set(QUESTIONS, tmp_path / "qa.jsonl")
    labels = {"decoder": "d", "encoder": "e", "eval_set": "test", "retriever": "r"}
    result = evaluate_rag(
        index=index_dir,
        qa_set=qa,
        checkpoint=tiny_checkpoint,
        out=tmp_path / "rag.json",
        recall_n=[1, 3],
        tokens_n=[1, 2],
        refrag_n=[1, 2, 4],
        questions=3,
        ttft_questions=2,
        ttft_repeats=2,
        max_new_tokens=3,
        batch_size=2,
        labels=labels,
    )
    assert json.loads((tmp_path / "rag.json").read_text())["run"]["k"] == 4
    assert len(result["recall"]) == 4  # every question of the set
    assert len(result["answers"]) == 3 * (1 + 2 + 3)  # the first `questions`, every config
    ttft = {(r["variant"], r["n"]): r for r in result["ttft"]}
    assert all(r["timings"] == 2 * 2 and r["ttft_ms"] > 0 for r in ttft.values())
    # more passages as tokens: more positions; as chunks: far fewer than as tokens
    assert ttft["full_context", 2]["positions"] > ttft["full_context", 1]["positions"]
    assert ttft["refrag", 2]["positions"] < ttft["full_context", 2]["positions"]
    table = rag_table(result, samples=50, seed=0)
    assert list(zip(table["variant"], table["n"])) == [
        ("no_context", 0),
        ("full_context", 1),
        ("refrag", 1),
        ("full_context", 2),
        ("refrag", 2),
        ("refrag", 4),
    ]
    assert (table["n_questions"] == 3).all() and (table["k"] == 4).all()
    assert table.loc[table["variant"] == "no_context", "choice_gain"].iloc[0] == 0
    equal = equal_latency(table)
    assert list(equal["tokens_n"]) == [1, 2]
    for _, row in equal.dropna(subset=["refrag_n"]).iterrows():
        assert row["refrag_ttft_ms"] <= row["tokens_ttft_ms"]
    table.to_csv(tmp_path / "rag.csv", index=False)
    recall_table(result["recall"], [1, 3], samples=50).to_csv(tmp_path / "recall.csv", index=False)
    equal.to_csv(tmp_path / "equal.csv", index=False)
    assert plot_rag(tmp_path / "rag.csv", tmp_path / "rag.png").stat().st_size > 10_000
    sections = report_sections(
        tmp_path / "rag.csv", tmp_path / "recall.csv", tmp_path / "equal.csv"
    )
    assert [title for title, _, _ in sections][0] == "Retrieval recall@n"
    assert "[" in sections[0][2]["recall_answer"].iloc[0]  # value [lo, hi]


def test_equal_latency_picks_the_most_passages_within_the_budget():
    table = pd.DataFrame(
        [
            {
                "variant": "full_context",
                "n": 1,
                "ttft_ms": 10.0,
                "exact_match": 0.1,
                "choice_accuracy": 0.3,
            },
            {
                "variant": "full_context",
                "n": 4,
                "ttft_ms": 40.0,
                "exact_match": 0.2,
                "choice_accuracy": 0.4,
            },
            {
                "variant": "refrag",
                "n": 1,
                "ttft_ms": 12.0,
                "exact_match": 0.0,
                "choice_accuracy": 0.3,
            },
            {
                "variant": "refrag",
                "n": 8,
                "ttft_ms": 30.0,
                "exact_match": 0.3,
                "choice_accuracy": 0.5,
            },
            {
                "variant": "refrag",
                "n": 16,
                "ttft_ms": 45.0,
                "exact_match": 0.4,
                "choice_accuracy": 0.6,
            },
        ]
    )
    equal = equal_latency(table)
    assert pd.isna(equal.loc[0, "refrag_n"])  # even one passage compressed is slower
    assert equal.loc[1, "refrag_n"] == 8 and equal.loc[1, "refrag_ttft_ms"] == 30.0
