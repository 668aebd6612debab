import json
import subprocess
import sys

import pandas as pd
import pytest

from refrag.data.corpus import assign_split, clean_wikitext, prepare_corpus, read_documents

from .fake_hub import FakeHub


def docs(n, length=3000):
    return [
        {"doc_id": f"doc{i}", "title": f"T{i}", "text": f"Document {i}. " + "word " * (length // 5)}
        for i in range(n)
    ]


def test_splits_are_by_document_and_deterministic(tmp_path):
    manifest = prepare_corpus(
        docs(60), tmp_path, validation_fraction=0.2, test_fraction=0.2, min_chars=100, seed=1
    )
    frames = {
        s: pd.read_parquet(tmp_path / f"{s}.parquet") for s in ("train", "validation", "test")
    }
    ids = [set(f["doc_id"]) for f in frames.values()]
    assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])
    assert sum(len(i) for i in ids) == 60
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert all(assign_split(d, 0.2, 0.2, seed=1) == "test" for d in frames["test"]["doc_id"])


def test_short_documents_are_dropped_and_empty_splits_refused(tmp_path):
    with pytest.raises(ValueError, match="split"):
        prepare_corpus(docs(2), tmp_path, validation_fraction=0.1, test_fraction=0.1)
    with pytest.raises(ValueError, match="at least"):
        prepare_corpus(
            docs(5, length=50), tmp_path, validation_fraction=0.1, test_fraction=0.1, min_chars=1000
        )


def test_wikitext_is_reduced_to_plain_text():
    import mwparserfromhell

    wiki = "'''Ada''' was a [[mathematician|maths person]].{{Citation needed}}<ref>x</ref>\n\n== Life ==\nBorn [[1815]]."
    text = clean_wikitext(wiki, mwparserfromhell)
    assert "Ada was a maths person." in text and "Born 1815." in text
    assert "[[" not in text and "{{" not in text and "ref" not in text


def test_local_folder_sources_read_txt_parquet_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    pd.DataFrame({"text": ["p1", "p2"], "title": ["x", "y"]}).to_parquet(tmp_path / "b.parquet")
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": 7, "text": "j"}) + "\n")
    got = list(read_documents(str(tmp_path)))
    assert [d["text"] for d in got] == ["plain text", "p1", "p2", "j"]
    assert [d["doc_id"] for d in got] == ["a", "b-0", "b-1", "7"]


def test_hf_dataset_source_downloads_through_huggingface_hub(tmp_path):
    """`hf:` corpora go through huggingface_hub's dataset download, here from a fake hub."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    pd.DataFrame({"id": ["a", "b"], "text": ["first doc", "second doc"]}).to_parquet(
        repo / "data/train.parquet"
    )
    (repo / "README.md").write_text("not fetched")
    with FakeHub({"datasets/org/texts": repo}) as hub:
        env = hub.env(tmp_path / "home", "hf_dataset_token")
        code = "import sys; from refrag.data.corpus import fetch_source; fetch_source('hf:org/texts', sys.argv[1])"
        result = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "fetched")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "fetched/README.md").exists()
    got = list(read_documents("hf:org/texts", tmp_path / "fetched"))
    assert [(d["doc_id"], d["text"]) for d in got] == [("a", "first doc"), ("b", "second doc")]
    assert all(
        auth == "Bearer hf_dataset_token" for _, path, auth in hub.requests if "org/texts" in path
    )


def test_a_flipped_byte_in_a_split_is_refused_by_its_reader(tmp_path):
    from refrag.data.corpus import read_split
    from refrag.io.integrity import IntegrityError

    prepare_corpus(docs(60), tmp_path, validation_fraction=0.2, test_fraction=0.2)
    assert len(read_split(tmp_path / "train.parquet", rule="prepare_corpus")) > 0
    data = bytearray((tmp_path / "train.parquet").read_bytes())
    data[len(data) // 3] ^= 0x01
    (tmp_path / "train.parquet").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="train.parquet: does not match") as err:
        read_split(tmp_path / "train.parquet", rule="prepare_corpus")
    assert str(err.value).endswith("rerun rule prepare_corpus")
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(IntegrityError, match="manifest.json: is damaged"):
        read_split(tmp_path / "test.parquet")
