"""Data at scale: a corpus shard read streamed (refrag.data.corpus.stream_documents) and
tokenized as it comes (refrag.data.shards.tokenize_stream): the same windows as the
whole-corpus path, and peak memory flat in the corpus's size (measured in a subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import zstandard

from refrag.data.corpus import (
    assign_split,
    hub_part,
    part_name,
    prepare_from_parts,
    read_split,
    shard_files,
    stream_documents,
    write_split_part,
)
from refrag.data.shards import gather_shards, iter_windows, read_shards, tokenize_stream

from .conftest import TEXT
from .fake_hub import COMMIT, FakeHub

SPLIT = {"validation_fraction": 0.2, "test_fraction": 0.2, "seed": 0}


def slimpajama_shard(path: Path, docs: list[dict]) -> Path:
    """A .jsonl.zst file as SlimPajama ships them (text, meta.redpajama_set_name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(d) + "\n" for d in docs).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    return path


def documents(n: int, start: int = 0) -> list[dict]:
    sets = ("RedPajamaArXiv", "RedPajamaBook", "RedPajamaGithub")
    return [
        {"text": (TEXT[i % 50 :] + " ") * 2, "meta": {"redpajama_set_name": sets[i % 3]}}
        for i in range(start, start + n)
    ]


def test_a_shard_streams_its_documents_of_the_asked_subsets(tmp_path):
    corpus = tmp_path / "train"
    shard = slimpajama_shard(corpus / "chunk1" / "example_train_0.jsonl.zst", documents(6))
    slimpajama_shard(corpus / "chunk2" / "example_train_0.jsonl.zst", documents(3))
    pd.DataFrame({"text": ["a" * 10, "b" * 10], "id": ["x", "y"]}).to_parquet(corpus / "p.parquet")
    assert [part_name(p, corpus) for p in shard_files(corpus)] == [
        "chunk1/example_train_0",
        "chunk2/example_train_0",  # the same file name in another folder: another name
        "p",
    ]
    kept = list(stream_documents(shard, ["RedPajamaArXiv", "RedPajamaBook"], name="chunk1/x"))
    assert [d["doc_id"] for d in kept] == ["chunk1/x-0", "chunk1/x-1", "chunk1/x-3", "chunk1/x-4"]
    assert kept[0]["text"] == (TEXT + " ") * 2
    parquet = list(stream_documents(corpus / "p.parquet", batch_rows=1))
    assert [d["doc_id"] for d in parquet] == ["x", "y"]


def test_shard_by_shard_gives_the_windows_of_the_whole_corpus(
    tmp_path, encoder_tokenizer, decoder_tokenizer
):
    corpus = tmp_path / "corpus"
    shards = [slimpajama_shard(corpus / f"s{i}.jsonl.zst", documents(8, 8 * i)) for i in range(3)]
    windows = {
        "encoder_tokenizer": encoder_tokenizer,
        "decoder_tokenizer": decoder_tokenizer,
        "context_tokens": 32,
        "target_tokens": 8,
    }
    parts, evaluation = [], []
    for shard in shards:
        docs = stream_documents(shard, name=part_name(shard, corpus))
        out = tmp_path / "parts" / shard.name.split(".")[0]
        tokenize_stream(
            docs, out, split="train", min_chars=0, max_windows=None, metadata={}, **SPLIT, **windows
        )
        parts.append(out)
        evaluation.append(tmp_path / f"{shard.name}.parquet")
        write_split_part(
            stream_documents(shard, name=part_name(shard, corpus)),
            evaluation[-1],
            splits=["validation", "test"],
            **SPLIT,
        )
    gathered = gather_shards(parts, tmp_path / "train", metadata={"split": "train"})
    # the whole-corpus path: every document in memory, its train split's windows
    every = [d for s in shards for d in stream_documents(s, name=part_name(s, corpus))]
    train = [d for d in every if assign_split(d["doc_id"], **SPLIT) == "train"]
    expected = pd.DataFrame(list(iter_windows(train, **windows)))
    got = read_shards(tmp_path / "train")
    assert gathered["rows"] == len(expected) > 0
    pd.testing.assert_frame_equal(got, expected)
    manifest = prepare_from_parts(evaluation, tmp_path / "splits", ["validation", "test"])
    for split in ("validation", "test"):
        ids = read_split(tmp_path / "splits" / f"{split}.parquet")["doc_id"].tolist()
        assert ids == [d["doc_id"] for d in every if assign_split(d["doc_id"], **SPLIT) == split]
        assert manifest["splits"][split]["documents"] == len(ids)


MEASURE = """
import json, resource, sys, tracemalloc
from refrag.data.corpus import stream_documents
from refrag.data.shards import iter_windows, tokenize_stream
from refrag.modeling.tokenization import load_tokenizer

shard, out, mode = sys.argv[1:4]
options = dict(encoder_tokenizer=load_tokenizer(sys.argv[4]),
               decoder_tokenizer=load_tokenizer(sys.argv[5]), context_tokens=256, target_tokens=64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
docs = stream_documents(shard)
if mode == "streamed":
    rows = tokenize_stream(docs, out, split="train", validation_fraction=0.0001,
                           test_fraction=0.0001, seed=0, min_chars=0, max_windows=None,
                           metadata={}, shard_rows=100, **options)["rows"]
else:  # the whole-corpus path: every document and window in memory
    rows = len(list(iter_windows(list(docs), **options)))
peak = tracemalloc.get_traced_memory()[1]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": rows, "python_peak_mib": peak / 2**20,
                  "rss_peak_growth_mib": (after - before) / 1024}))
"""


def measure(tmp_path: Path, shard: Path, mode: str, decoder_dir, encoder_dir) -> dict:
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    out = tmp_path / f"out-{shard.name.split('.')[0]}-{mode}"
    result = subprocess.run(
        [sys.executable, str(script), str(shard), str(out), mode, str(encoder_dir)]
        + [str(decoder_dir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_streamed_tokenization_memory_is_flat_in_the_corpus_size(
    tmp_path, decoder_dir, encoder_dir
):
    """The Python heap's peak (tracemalloc) while tokenizing shards of 200 and 800
    documents (0.7 and 2.8 MB of text; 256 + 64-token windows): flat when streamed (one
    document and one shard of rows, 100 here), growing with the corpus on the whole-corpus path.
    The process's peak RSS growth is printed beside it (-s)."""
    small = slimpajama_shard(tmp_path / "small.jsonl.zst", documents(200))
    large = slimpajama_shard(tmp_path / "large.jsonl.zst", documents(800))
    args = (decoder_dir, encoder_dir)
    streamed = [measure(tmp_path, s, "streamed", *args) for s in (small, large)]
    whole = [measure(tmp_path, s, "whole", *args) for s in (small, large)]
    print({"streamed": streamed, "whole": whole})
    assert streamed[1]["rows"] > 3.9 * streamed[0]["rows"] > 0
    assert streamed[1]["python_peak_mib"] < 1.25 * streamed[0]["python_peak_mib"]
    assert whole[1]["python_peak_mib"] > 3 * whole[0]["python_peak_mib"]


@pytest.mark.slow
def test_the_workflow_tokenizes_a_streamed_corpus_one_job_per_shard(
    tmp_path, decoder_dir, encoder_dir, encoder_tokenizer, decoder_tokenizer, monkeypatch
):
    """corpus.streamed: two .jsonl.zst shards, a split_part and a tokenize_part job each;
    the train windows are each shard's first ones (max_windows shared by the shards), the
    test split is tokenized from the gathered evaluation documents as before. Then the same
    files served as an hf: dataset by a fake hub, streamed in 2 parts planned offline: the
    same train and test windows."""
    from .test_workflow import override, planned_jobs, snakemake, tiny_workspace

    ws = tiny_workspace(
        tmp_path,
        decoder_dir,
        encoder_dir,
        runs=[{"decoder": "tiny-decoder", "encoder": "tiny-encoder", "k": [4]}],
        windows=30,
        steps=1,
    )
    texts = [p.read_text() for p in sorted((tmp_path / "corpus").glob("*.txt"))]
    corpus = tmp_path / "streamed"
    for i in range(2):
        slimpajama_shard(
            corpus / f"chunk{i}" / "example_train_0.jsonl.zst",
            [{"text": t, "meta": {"redpajama_set_name": "RedPajamaArXiv"}} for t in texts[i::2]],
        )
    args = override(
        ws, {"corpus": {"source": str(corpus), "streamed": True, "subsets": ["RedPajamaArXiv"]}}
    )
    train = "results/shards/tiny/tiny-decoder/tiny-encoder/train"
    test = "results/shards/tiny/tiny-decoder/tiny-encoder/test"
    jobs = planned_jobs(ws, train, test, *args)
    assert {k: jobs.get(k) for k in ("split_part", "tokenize_part", "gather_train_shards")} == {
        "split_part": 2,
        "tokenize_part": 2,
        "gather_train_shards": 1,
    }
    assert (jobs["prepare_corpus"], jobs["tokenize"]) == (1, 1)  # test split only
    snakemake(ws, train, test, "--cores", "2", *args)
    split = {"validation_fraction": 0.2, "test_fraction": 0.25, "seed": 0}
    expected = []
    for shard in shard_files(corpus):
        docs = [
            d
            for d in stream_documents(shard, name=part_name(shard, corpus))
            if assign_split(d["doc_id"], **split) == "train"
        ]
        rows = iter_windows(
            docs,
            encoder_tokenizer=encoder_tokenizer,
            decoder_tokenizer=decoder_tokenizer,
            context_tokens=32,
            target_tokens=8,
        )
        expected += list(rows)[:15]  # 30 / 2 per shard
    pd.testing.assert_frame_equal(read_shards(ws / train), pd.DataFrame(expected))
    manifest = json.loads((ws / train / "manifest.json").read_text())
    assert manifest["rows"] == len(expected) and manifest["context_tokens"] == 32
    assert read_shards(ws / test)["doc_id"].str.startswith("chunk").all()

    # the same files as an hf: dataset's train/ folder, streamed in 2 parts from a fake hub
    hub_args = override(
        ws,
        {
            "corpus": {
                "name": "tiny-hub",
                "source": "hf:org/slimpajama",
                "streamed": True,
                "shards": 2,
                "data_dir": "train",
                "subsets": ["RedPajamaArXiv"],
            }
        },
    )
    hub_train, hub_test = (t.replace("/tiny/", "/tiny-hub/") for t in (train, test))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the plan needs no network
    jobs = planned_jobs(ws, hub_train, hub_test, *hub_args)
    assert {k: jobs.get(k) for k in ("split_part", "tokenize_part", "fetch_corpus")} == {
        "split_part": 2,
        "tokenize_part": 2,
        "fetch_corpus": None,
    }
    repo = tmp_path / "hub-repo"
    shutil.copytree(corpus, repo / "train")
    slimpajama_shard(repo / "validation" / "x.jsonl.zst", [{"text": texts[0], "meta": {}}])
    with FakeHub({"datasets/org/slimpajama": repo}) as hub:
        for key, value in hub.env(tmp_path / "hf-home", "hf_secret_test_token").items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("HF_HUB_OFFLINE")
        snakemake(ws, hub_train, hub_test, "--cores", "2", *hub_args)
    pd.testing.assert_frame_equal(read_shards(ws / hub_train), read_shards(ws / train))
    pd.testing.assert_frame_equal(read_shards(ws / hub_test), read_shards(ws / test))
    manifest = json.loads((ws / hub_train / "manifest.json").read_text())
    assert manifest["source"] == f"hf:org/slimpajama@{COMMIT}"
    assert not any("validation/" in path for _, path, _ in hub.requests)


def test_a_streamed_corpus_that_cannot_stream_is_refused_in_one_line(tmp_path):
    from refrag.preflight import corpus_errors

    hub = {"corpus": {"source": "hf:cerebras/SlimPajama-627B", "streamed": True}}
    assert corpus_errors(hub) == [
        "config corpus.shards: streaming 'hf:cerebras/SlimPajama-627B' needs the number of "
        "part jobs (each streams every shards-th data file)"
    ]
    assert corpus_errors({"corpus": hub["corpus"] | {"shards": 4}}) == []  # no network
    embedded = {"corpus": {"source": "embedded:gensim-enwiki", "streamed": True}}
    assert "needs a folder of shard files or hf:<dataset>" in corpus_errors(embedded)[0]
    empty = {"corpus": {"source": str(tmp_path), "streamed": True}}
    assert "holds no .parquet, .jsonl or .jsonl.zst shard" in corpus_errors(empty)[0]
    slimpajama_shard(tmp_path / "a.jsonl.zst", documents(2))
    good = {"corpus": {"source": str(tmp_path), "streamed": True, "min_chars": 10}}
    assert corpus_errors(good) == []
    train = good | {"eval": {"sets": ["train"]}}
    assert "keeps no train split to evaluate on" in corpus_errors(train)[0]


def slimpajama_repo(root: Path) -> Path:
    """A tiny SlimPajama-like dataset repository: four train files in two chunk folders (the
    same file names in each, as SlimPajama has), a validation file and a README."""
    for chunk in range(2):
        for i in range(2):
            slimpajama_shard(
                root / "train" / f"chunk{chunk}" / f"example_train_{i}.jsonl.zst",
                documents(6, 12 * chunk + 6 * i),
            )
    slimpajama_shard(root / "validation" / "chunk0" / "example_holdout_0.jsonl.zst", documents(3))
    (root / "README.md").write_text("SlimPajama-like\n")
    return root


@pytest.fixture
def fake_slimpajama(tmp_path, monkeypatch):
    """The repository served as dataset org/slimpajama by a fake hub on loopback, the
    in-process huggingface_hub pointed at it (HF_TOKEN set), temporary files under tmp/."""
    import huggingface_hub.constants as hf

    repo = slimpajama_repo(tmp_path / "repo")
    with FakeHub({"datasets/org/slimpajama": repo}) as hub:
        monkeypatch.setattr(hf, "ENDPOINT", hub.url)
        monkeypatch.setattr(
            hf, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_secret_test_token")
        (tmp_path / "tmp").mkdir()
        monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
        yield hub, repo


def test_hub_parts_stream_the_files_and_windows_of_a_local_copy(
    tmp_path, fake_slimpajama, encoder_tokenizer, decoder_tokenizer
):
    """A streamed hf: dataset in 3 parts (part i: its train files i::3, listed at run time
    at one commit) gives the documents, splits and train windows of the same train/ folder
    read locally one file per job; one file on disk at a time, deleted once read."""
    hub, repo = fake_slimpajama
    subsets = ["RedPajamaArXiv", "RedPajamaBook"]
    parts = [hub_part("hf:org/slimpajama", i, 3, "train") for i in range(3)]
    local = repo / "train"
    files = [p.relative_to(repo).as_posix() for p in shard_files(local)]
    assert [list(p.files) for p in parts] == [files[0::3], files[1::3], files[2::3]]
    assert {p.revision for p in parts} == {COMMIT}
    assert parts[0].origin() == {
        "source": f"hf:org/slimpajama@{COMMIT}",
        "files": [
            "train/chunk0/example_train_0.jsonl.zst",
            "train/chunk1/example_train_1.jsonl.zst",
        ],
    }
    windows = {
        "encoder_tokenizer": encoder_tokenizer,
        "decoder_tokenizer": decoder_tokenizer,
        "context_tokens": 32,
        "target_tokens": 8,
    }
    hub_docs = [d for p in parts for d in p.documents(subsets)]
    assert not any((tmp_path / "tmp").iterdir())  # every downloaded file deleted once read
    folder_docs = [
        d
        for f in shard_files(local)
        for d in stream_documents(f, subsets, name=part_name(f, local))
    ]
    key = lambda d: d["doc_id"]  # noqa: E731
    assert sorted(hub_docs, key=key) == sorted(folder_docs, key=key)
    assert len(hub_docs) == 16 and hub_docs[0]["doc_id"] == "chunk0/example_train_0-0"
    got, expected = [], []
    for i, part in enumerate(parts):
        out = tmp_path / "hub" / str(i)
        tokenize_stream(
            part.documents(subsets),
            out,
            split="train",
            min_chars=0,
            max_windows=None,
            metadata={"read": part.origin()},
            **SPLIT,
            **windows,
        )
        got.append(out)
    for f in shard_files(local):
        out = tmp_path / "folder" / f.parent.name / f.name
        tokenize_stream(
            stream_documents(f, subsets, name=part_name(f, local)),
            out,
            split="train",
            min_chars=0,
            max_windows=None,
            metadata={},
            **SPLIT,
            **windows,
        )
        expected.append(out)
    manifest = gather_shards(got, tmp_path / "hub-train", metadata={})
    assert manifest["source"] == f"hf:org/slimpajama@{COMMIT}"
    gather_shards(expected, tmp_path / "folder-train", metadata={})
    order = ["doc_id", "window"]
    hub_rows = read_shards(tmp_path / "hub-train").sort_values(order, ignore_index=True)
    folder_rows = read_shards(tmp_path / "folder-train").sort_values(order, ignore_index=True)
    assert len(hub_rows) > 0
    pd.testing.assert_frame_equal(hub_rows, folder_rows)
    requested = [path for _, path, _ in hub.requests]
    assert not any("validation/" in path or "README" in path for path in requested)
    repo_requests = [auth for _, path, auth in hub.requests if "org/slimpajama" in path]
    assert set(repo_requests) == {"Bearer hf_secret_test_token"}


def test_parts_read_at_different_commits_are_not_gathered(tmp_path):
    parts = []
    for i, commit in enumerate(("a" * 40, "b" * 40)):
        out = tmp_path / str(i)
        tokenize_stream(
            [],
            out,
            split="train",
            validation_fraction=0.1,
            test_fraction=0.1,
            seed=0,
            min_chars=0,
            max_windows=None,
            encoder_tokenizer=None,
            decoder_tokenizer=None,
            context_tokens=4,
            target_tokens=4,
            metadata={"read": {"source": f"hf:org/x@{commit}", "files": []}},
        )
        parts.append(out)
    with pytest.raises(ValueError, match="corpus parts read different sources: hf:org/x@a"):
        gather_shards(parts, tmp_path / "train", metadata={})
