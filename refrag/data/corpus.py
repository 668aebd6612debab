"""Text corpora: fetch a source, clean it, split it by document, write Parquet with a manifest.

Sources (``corpus.source`` in the config):

- ``embedded:gensim-enwiki``: 107 real Wikipedia articles shipped inside the ``gensim`` wheel
  (downloaded with ``pip download --no-deps``, never installed), wiki markup stripped with
  mwparserfromhell;
- a local folder of ``*.txt`` files (one document each) or ``*.parquet`` files with a ``text``
  column (and optionally ``doc_id``/``title``);
- ``hf:<dataset>[@revision]``: the Parquet/JSON-lines/text files of a Hugging Face dataset
  repository, with a ``text`` column (needs the network; token from ``HF_TOKEN``).

At scale (``corpus.streamed``) a folder of shard files (``*.parquet``, ``*.jsonl``,
``*.jsonl.zst`` such as SlimPajama's) is never loaded whole: :func:`stream_documents` reads
one file in record batches or lines, keeps the ``subsets`` asked for (SlimPajama's
``meta.redpajama_set_name``), and each document's split comes from a hash of its id
(:func:`assign_split`), so each shard is tokenized by its own job (refrag.data.shards).
A streamed ``hf:`` dataset is cut into a configured number of parts (``corpus.shards``, known
without the network): part i lists the dataset's data files once at run time and streams
files i, i + N, ... one at a time (:func:`hub_part`), never holding more than one on disk.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import mwparserfromhell
import pandas as pd
import pyarrow.parquet as pq
import zstandard
from huggingface_hub import HfApi, hf_hub_download, snapshot_download

from refrag.io.integrity import IntegrityError, atomic_file, read_manifest, verify_file, write_json
from refrag.io.models import download_wheel

SPLITS = ("train", "validation", "test")
STREAMED_SUFFIXES = (".parquet", ".jsonl", ".jsonl.zst")


EMBEDDED_CORPORA = {
    "gensim-enwiki": (
        "gensim",
        "4.4.0",
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    ),
}


def fetch_source(source: str, out_dir: str | os.PathLike) -> Path:
    """Bring a remote source into ``out_dir``: an embedded corpus's raw dump, or the data files
    of a Hugging Face dataset (``hf:<repo>[@revision]``). Local folders are read in place."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if source.startswith("hf:"):
        repo, _, revision = source.removeprefix("hf:").partition("@")
        snapshot_download(
            repo_id=repo,
            repo_type="dataset",
            revision=revision or None,
            local_dir=out_dir,
            token=os.environ.get("HF_TOKEN") or None,
            allow_patterns=["*.parquet", "*.jsonl", "*.txt"],
        )
        shutil.rmtree(out_dir / ".cache", ignore_errors=True)
        return out_dir
    name = source.removeprefix("embedded:")
    if not source.startswith("embedded:") or name not in EMBEDDED_CORPORA:
        raise ValueError(
            f"corpus source {source!r} is neither hf:<dataset> nor one of: {', '.join('embedded:' + n for n in EMBEDDED_CORPORA)}"
        )
    package, version, member = EMBEDDED_CORPORA[name]
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(package, version, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            (out_dir / Path(member).name).write_bytes(zf.read(member))
    return out_dir


def read_documents(source: str, fetched: str | os.PathLike | None = None) -> Iterator[dict]:
    """Documents of a source as ``{"doc_id", "title", "text"}``; ``fetched`` is the folder that
    :func:`fetch_source` filled for an embedded or ``hf:`` source."""
    if source.startswith("embedded:"):
        for dump in sorted(Path(fetched).glob("*.bz2")):
            yield from read_mediawiki_dump(dump)
    elif source.startswith("hf:"):
        yield from _read_folder(Path(fetched))
    else:
        yield from _read_folder(Path(source))


def read_mediawiki_dump(path: str | os.PathLike) -> Iterator[dict]:
    """Articles (namespace 0, no redirects) of a bz2 MediaWiki XML dump, as plain text."""
    with bz2.open(path, "rb") as fh:
        for _, elem in ET.iterparse(fh):
            if not elem.tag.endswith("}page"):
                continue
            ns = {"m": elem.tag[: -len("page")].strip("{}")}
            title = elem.findtext("m:title", namespaces={"m": ns["m"]}) or ""
            namespace = elem.findtext("m:ns", namespaces={"m": ns["m"]})
            page_id = elem.findtext("m:id", namespaces={"m": ns["m"]})
            wikitext = elem.findtext("m:revision/m:text", namespaces={"m": ns["m"]}) or ""
            elem.clear()
            if namespace != "0" or wikitext.lstrip().lower().startswith("#redirect"):
                continue
            yield {
                "doc_id": f"enwiki-{page_id}",
                "title": title,
                "text": clean_wikitext(wikitext, mwparserfromhell),
            }


def clean_wikitext(wikitext: str, mwparserfromhell) -> str:
    """Plain text of a wiki article: markup, templates, tables and references removed."""
    text = mwparserfromhell.parse(wikitext).strip_code(normalize=True, collapse=True)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
    text = re.sub(r"^\s*(?:thumb\|.*|\{\|.*|\|.*)$", "", text, flags=re.MULTILINE)
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _read_folder(folder: Path) -> Iterator[dict]:
    """``*.txt`` (one document each), ``*.parquet`` and ``*.jsonl`` (a ``text`` column, and
    optionally ``doc_id``/``id`` and ``title``) under ``folder``."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"corpus source {str(folder)!r} is not a folder (nor embedded:/hf:)"
        )
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".txt":
            yield {"doc_id": path.stem, "title": path.stem, "text": path.read_text()}
        elif path.suffix in (".parquet", ".jsonl"):
            frame = (
                pd.read_parquet(path)
                if path.suffix == ".parquet"
                else pd.read_json(path, lines=True)
            )
            for i, row in enumerate(frame.to_dict("records")):
                doc_id = row.get("doc_id", row.get("id", f"{path.stem}-{i}"))
                yield {
                    "doc_id": str(doc_id),
                    "title": str(row.get("title", "")),
                    "text": row["text"],
                }


def assign_split(
    doc_id: str, validation_fraction: float, test_fraction: float, seed: int = 0
) -> str:
    """Deterministic split of a document from a hash of its id (stable as the corpus grows)."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + validation_fraction else "train"


def prepare_corpus(
    documents: Iterable[dict],
    out_dir: str | os.PathLike,
    *,
    validation_fraction: float,
    test_fraction: float,
    min_chars: int = 0,
    seed: int = 0,
) -> dict:
    """Write ``{train,validation,test}.parquet`` and ``manifest.json`` (counts and checksums)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(
        [d for d in documents if len(d["text"]) >= min_chars], columns=["doc_id", "title", "text"]
    )
    if frame.empty:
        raise ValueError(f"no document has at least {min_chars} characters")
    frame["split"] = [
        assign_split(d, validation_fraction, test_fraction, seed) for d in frame["doc_id"]
    ]
    return _write_splits(frame, out_dir, SPLITS, {}, f"the corpus has only {len(frame)} documents")


def _write_splits(
    frame: pd.DataFrame, out_dir: Path, splits: Iterable[str], manifest: dict, if_empty: str
) -> dict:
    """``{split}.parquet`` of each split of ``frame`` (its ``split`` column), then
    ``manifest.json`` (``manifest`` with each file's counts and checksum) last: it vouches
    for the splits."""
    if frame["doc_id"].duplicated().any():
        raise ValueError(
            f"duplicate document ids: {frame.loc[frame['doc_id'].duplicated(), 'doc_id'].tolist()[:5]}"
        )
    manifest = {"splits": {}} | manifest
    for split in splits:
        part = frame[frame["split"] == split].drop(columns="split").reset_index(drop=True)
        if part.empty:
            raise ValueError(f"split {split!r} is empty: {if_empty}")
        path = out_dir / f"{split}.parquet"
        with atomic_file(path) as tmp:
            part.to_parquet(tmp, index=False)
        manifest["splits"][split] = {
            "file": path.name,
            "documents": len(part),
            "characters": int(part["text"].str.len().sum()),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def read_split(
    path: str | os.PathLike, manifest: str | os.PathLike | None = None, rule: str | None = None
) -> pd.DataFrame:
    """A split written by :func:`prepare_corpus`, checked against the sha256 in its manifest
    (``manifest.json`` beside it by default); raises :class:`~refrag.io.integrity.IntegrityError`."""
    path = Path(path)
    manifest = read_manifest(manifest or path.with_name("manifest.json"), rule)
    entry = next(
        (e for e in manifest.get("splits", {}).values() if e.get("file") == path.name), None
    )
    if entry is None:
        raise IntegrityError(path, "is not listed in its manifest", rule)
    verify_file(path, entry["sha256"], rule)
    return pd.read_parquet(path)


def shard_files(folder: str | os.PathLike) -> list[Path]:
    """The shard files of a streamed corpus folder, sorted (their index names their job)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus source {str(folder)!r} is not a folder")
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name.endswith(STREAMED_SUFFIXES)
    )


def stream_documents(
    path: str | os.PathLike,
    subsets: Iterable[str] = (),
    name: str | None = None,
    batch_rows: int = 256,
) -> Iterator[dict]:
    """Documents of one shard file as ``{"doc_id", "title", "text"}``, read a record batch
    (Parquet) or a line (JSON lines, zstd-compressed or not) at a time; with ``subsets``,
    only those whose ``meta.redpajama_set_name`` is one of them. Ids: the row's
    ``doc_id``/``id``, else ``<name>-<row>`` (``name``: the shard's path in its corpus, e.g.
    ``chunk1/example_train_0``; SlimPajama repeats file names across folders)."""
    path, wanted = Path(path), set(subsets)
    stem = name or path.name.split(".")[0]
    for i, row in enumerate(_rows(path, batch_rows)):
        if wanted and (row.get("meta") or {}).get("redpajama_set_name") not in wanted:
            continue
        yield {
            "doc_id": str(row.get("doc_id", row.get("id", f"{stem}-{i}"))),
            "title": str(row.get("title") or ""),
            "text": row["text"],
        }


def _rows(path: Path, batch_rows: int) -> Iterator[dict]:
    if path.suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            yield from batch.to_pylist()
        return
    with open(path, "rb") as raw:
        binary = zstandard.ZstdDecompressor().stream_reader(raw) if path.suffix == ".zst" else raw
        for line in io.TextIOWrapper(binary, encoding="utf-8"):
            if line.strip():
                yield json.loads(line)


def part_name(path: str | os.PathLike, folder: str | os.PathLike) -> str:
    """A shard's name in its corpus: its path under ``folder``, without suffixes."""
    relative = Path(path).relative_to(folder)
    return str(relative.parent / relative.name.split(".")[0])


def write_split_part(
    documents: Iterable[dict],
    out: str | os.PathLike,
    *,
    splits: Iterable[str],
    validation_fraction: float,
    test_fraction: float,
    min_chars: int = 0,
    seed: int = 0,
) -> int:
    """The documents of one streamed shard that belong to ``splits`` (the small evaluation
    splits), with a ``split`` column, as one Parquet file; how many."""
    wanted = set(splits)
    rows = []
    for doc in documents:
        if len(doc["text"]) < min_chars:
            continue
        split = assign_split(doc["doc_id"], validation_fraction, test_fraction, seed)
        if split in wanted:
            rows.append(
                {
                    "doc_id": doc["doc_id"],
                    "title": doc["title"],
                    "text": doc["text"],
                    "split": split,
                }
            )
    frame = pd.DataFrame(rows, columns=["doc_id", "title", "text", "split"])
    with atomic_file(Path(out)) as tmp:
        frame.to_parquet(tmp, index=False)
    return len(frame)


def prepare_from_parts(
    parts: Iterable[str | os.PathLike], out_dir: str | os.PathLike, splits: Iterable[str]
) -> dict:
    """``{split}.parquet`` of each of ``splits`` and ``manifest.json`` (as
    :func:`prepare_corpus` writes them), from the per-shard files of
    :func:`write_split_part`; the train split, streamed, has none."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    return _write_splits(
        frame, out_dir, splits, {"streamed": True}, "raise its fraction or add shards"
    )


@dataclass(frozen=True)
class HubPart:
    """Part ``part`` of ``parts`` of a streamed ``hf:`` dataset: its data files (repository
    paths under ``data_dir``) at one commit, every ``parts``-th from the ``part``-th."""

    repo: str
    revision: str
    data_dir: str
    files: tuple[str, ...]

    def name(self, file: str) -> str:
        """A file's name in its corpus, as :func:`part_name` names it under a local copy of
        ``data_dir`` (so both give the same document ids, hence the same splits)."""
        relative = PurePosixPath(file).relative_to(self.data_dir or ".")
        return str(relative.parent / relative.name.split(".")[0])

    def documents(self, subsets: Iterable[str] = ()) -> Iterator[dict]:
        """The documents of this part's files, in order: one file downloaded at a time into a
        temporary folder (deleted when read), read streamed by :func:`stream_documents`."""
        subsets = list(subsets)
        for file in self.files:
            with tempfile.TemporaryDirectory(prefix="refrag-hub-") as tmp:
                path = hf_hub_download(
                    self.repo,
                    file,
                    repo_type="dataset",
                    revision=self.revision,
                    local_dir=tmp,
                    token=os.environ.get("HF_TOKEN") or None,
                )
                yield from stream_documents(path, subsets, name=self.name(file))

    def origin(self) -> dict:
        """What this part read, for its manifest and log."""
        return {"source": f"hf:{self.repo}@{self.revision}", "files": list(self.files)}


def hub_part(source: str, part: int, parts: int, data_dir: str = "") -> HubPart:
    """Part ``part`` of ``parts`` of the ``hf:<dataset>[@revision]`` source: its data files
    (``.parquet``, ``.jsonl``, ``.jsonl.zst`` under ``data_dir``, sorted) listed once at the
    revision's commit (token from ``HF_TOKEN``); raises ValueError if it has none."""
    if not 0 <= part < parts:
        raise ValueError(f"corpus part {part} is not among {parts} parts")
    repo, _, revision = source.removeprefix("hf:").partition("@")
    api = HfApi(token=os.environ.get("HF_TOKEN") or None)
    commit = api.dataset_info(repo, revision=revision or None).sha
    prefix = f"{data_dir.strip('/')}/" if data_dir.strip("/") else ""
    files = sorted(
        f
        for f in api.list_repo_files(repo, repo_type="dataset", revision=commit)
        if f.startswith(prefix) and f.endswith(STREAMED_SUFFIXES)
    )
    if not files:
        where = f" under {prefix!r}" if prefix else ""
        raise ValueError(
            f"corpus source {source!r} holds no .parquet, .jsonl or .jsonl.zst file{where}"
        )
    return HubPart(repo, commit, prefix.rstrip("/"), tuple(files[part::parts]))


def part_documents(
    source: str,
    *,
    part: int,
    parts: int,
    subsets: Iterable[str] = (),
    data_dir: str = "",
    shard: str | os.PathLike | None = None,
    name: str | None = None,
) -> tuple[Iterator[dict], dict]:
    """The documents of one part of a streamed corpus and what they are read from: files
    ``part::parts`` of an ``hf:`` dataset (:func:`hub_part`), or the folder's ``shard`` file."""
    if source.startswith("hf:"):
        hub = hub_part(source, part, parts, data_dir)
        return hub.documents(subsets), hub.origin()
    return stream_documents(shard, subsets, name=name), {"source": source, "files": [name]}
