"""refrag.retrieval: passages cut from documents, the sentence encoder, the FAISS index
(build, save, load, search) and `refrag retrieve`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from refrag.io.integrity import IntegrityError
from refrag.retrieval import Passage, PassageIndex, SentenceEncoder, chunk_documents

DOCS = [
    {
        "doc_id": "engine",
        "title": "Analytical Engine",
        "text": "The Analytical Engine was a mechanical computer designed by Charles Babbage. "
        "It was first described in 1837 as the successor to the difference engine. " * 3,
    },
    {
        "doc_id": "volcano",
        "title": "Volcano",
        "text": "A volcano is a rupture in the crust of a planet that lets hot lava, volcanic "
        "ash and gases escape from a magma chamber below the surface. " * 3,
    },
    {
        "doc_id": "football",
        "title": "Association football",
        "text": "Association football is a team sport played between two teams of eleven "
        "players who move a ball with their feet to score goals. " * 3,
    },
]


@pytest.fixture(scope="module")
def encoder(encoder_dir) -> SentenceEncoder:
    return SentenceEncoder(encoder_dir)


@pytest.fixture(scope="module")
def index(encoder_dir, encoder) -> PassageIndex:
    return PassageIndex.build(
        chunk_documents(DOCS, words=20), encoder_dir, encoder=encoder, progress=False
    )


def test_passages_cover_each_document_in_order_with_offsets():
    text = "one two  three\nfour five six seven"
    passages = chunk_documents([{"doc_id": "d", "text": text}], words=3)
    assert [p.text for p in passages] == ["one two  three", "four five six", "seven"]
    assert [p.passage_id for p in passages] == ["d#p0", "d#p1", "d#p2"]
    assert all(text[p.start : p.start + len(p.text)] == p.text for p in passages)
    overlapping = chunk_documents([{"doc_id": "d", "text": text}], words=3, overlap=1)
    assert [p.text for p in overlapping] == ["one two  three", "three\nfour five", "five six seven"]
    with pytest.raises(ValueError, match="overlap"):
        chunk_documents(DOCS, words=3, overlap=3)


def test_encoder_is_mean_pooled_and_normalized_like_sentence_transformers(encoder_dir, encoder):
    texts = ["A short sentence.", "A much longer sentence about mechanical computers and engines."]
    tok = AutoTokenizer.from_pretrained(encoder_dir)
    model = AutoModel.from_pretrained(encoder_dir).eval()
    expected = []
    for text in texts:  # one at a time: no padding, a plain mean over the tokens
        with torch.no_grad():
            states = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
        mean = states.mean(0)
        expected.append((mean / mean.norm()).numpy())
    got = encoder.encode(texts, batch_size=2)  # batched: padding must not change the vectors
    assert got.shape == (2, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.stack(expected), atol=1e-5)
    assert encoder.max_length == 256  # sentence_bert_config.json's max_seq_length


def test_search_ranks_the_relevant_document_first_with_cosine_scores(index):
    top = index.search("Who designed the mechanical computer?", 3)
    assert [type(p) for p in top] == [Passage] * 3
    assert top[0].doc_id == "engine"
    assert top[0].score >= top[1].score >= top[2].score
    assert -1.0 <= top[2].score <= top[0].score <= 1.0 + 1e-6
    assert index.search("lava and magma", 1)[0].doc_id == "volcano"
    assert len(index.search("football", 100)) == len(index)
    with pytest.raises(ValueError, match="at least 1"):
        index.search("x", 0)


def test_saved_index_loads_verified_and_searches_the_same(tmp_path, index, encoder_dir):
    folder = index.save(tmp_path / "index")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["passages"] == len(index) and meta["documents"] == 3 and meta["dim"] == 384
    loaded = PassageIndex.load(folder)
    query = "a sport with a ball and goals"
    assert loaded.search(query, 4) == index.search(query, 4)
    (folder / "passages.parquet").write_bytes(b"damaged")
    with pytest.raises(IntegrityError, match="passages.parquet"):
        PassageIndex.load(folder)


def test_an_index_refuses_another_encoder(tmp_path, index, tiny_model_dirs):
    folder = index.save(tmp_path / "index")
    with pytest.raises(ValueError, match="weights differ"):
        PassageIndex.load(folder, tiny_model_dirs["encoder"])
