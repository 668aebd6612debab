"""Artifacts that are verified before use.

- A folder (a model checkpoint) carries ``integrity.json``: the SHA-256 and size of every file
  in it, written last, once the files are complete (:func:`write_manifest`); a reader calls
  :func:`verify_folder` before loading anything from it.
- A single Parquet file (the alignment cache) carries a digest of its decoded contents in its
  own metadata (:func:`write_parquet` / :func:`read_parquet`), so it travels as one file.
- A file listed in another manifest (corpus splits, shards) is checked with :func:`verify_file`.

A mismatch raises :class:`IntegrityError`: one line naming the file and, when the caller knows
it, the step to rerun (``rule``: an optional hint; the library knows nothing of workflows).
Writes go to a temporary name and are renamed into place (:func:`atomic_file`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "integrity.json"


PARQUET_DIGEST_KEY = b"refrag.content_sha256"


class IntegrityError(ValueError):
    """A damaged, incomplete or unverifiable artifact: ``path``, what is wrong, what to rerun."""

    def __init__(self, path: str | os.PathLike, problem: str, rule: str | None = None):
        self.path, self.problem, self.rule = Path(path), problem, rule
        super().__init__(str(self))

    def __str__(self) -> str:
        fix = (
            f"rerun rule {self.rule}" if self.rule else "rebuild it (rerun the step that wrote it)"
        )
        return f"{self.path}: {self.problem}; {fix}"


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside ``path``, flushed to disk and renamed onto it when the block ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, content: object) -> None:
    """Write JSON atomically."""
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(content, indent=2, default=str) + "\n")


# -- folders ---------------------------------------------------------------------------------
def write_manifest(folder: str | os.PathLike) -> dict:
    """Record the SHA-256 and size of every file under ``folder`` in ``folder/integrity.json``.

    Call it last, when every file is written: the manifest's presence marks the folder complete.
    """
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}.")
    }
    manifest = {"files": files}
    write_json(folder / MANIFEST, manifest)
    return manifest


def verify_folder(folder: str | os.PathLike, rule: str | None = None) -> None:
    """Raise :class:`IntegrityError` unless ``folder`` has a manifest that all its files match."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IntegrityError(folder, "no such folder", rule)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise IntegrityError(
            folder, f"has no {MANIFEST} (its save did not complete, or it predates checksums)", rule
        )
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise IntegrityError(manifest_path, f"is damaged ({type(err).__name__})", rule) from None
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise IntegrityError(path, f"is missing (listed in {MANIFEST})", rule)
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise IntegrityError(
                path, f"has {size} bytes, {expected['bytes']} when it was written", rule
            )
        if sha256_file(path) != expected["sha256"]:
            raise IntegrityError(path, f"does not match its checksum in {MANIFEST}", rule)


def verify_file(path: str | os.PathLike, sha256: str, rule: str | None = None) -> None:
    """Raise :class:`IntegrityError` unless ``path`` exists and has this SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(path, "is missing", rule)
    if sha256_file(path) != sha256:
        raise IntegrityError(path, "does not match the checksum in its manifest", rule)


def read_manifest(path: str | os.PathLike, rule: str | None = None) -> dict:
    """A JSON manifest, or :class:`IntegrityError` if it is missing or does not parse."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise IntegrityError(path, "is missing", rule) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise IntegrityError(path, f"is damaged ({type(err).__name__})", rule) from None


# -- single Parquet files --------------------------------------------------------------------
def table_digest(table) -> str:
    """SHA-256 of a ``pyarrow.Table``'s column names, types and values (not its file bytes), so
    it can be stored in the file's own metadata and recomputed after reading."""
    digest = hashlib.sha256()
    for name in table.column_names:
        column = table.column(name)
        kind = _type_name(column.type)
        digest.update(f"{name}|{kind}|{len(column)}|{column.null_count}|".encode())
        _hash_array(digest, column.combine_chunks())
    return digest.hexdigest()


def _type_name(kind) -> str:
    """A type's name without list field names (Parquet renames ``item`` to ``element``)."""
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return f"list<{_type_name(kind.value_type)}>"
    return str(kind)


def _hash_array(digest, array) -> None:
    kind = array.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        offsets = np.asarray(array.offsets, dtype=np.int64)
        digest.update((offsets - offsets[0]).tobytes())
        _hash_array(digest, array.flatten())
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        digest.update(array.to_numpy(zero_copy_only=False).tobytes())
    else:
        for value in array.to_pylist():
            data = value if isinstance(value, bytes) else repr(value).encode()
            digest.update(len(data).to_bytes(8, "little") + data)


def write_parquet(frame, path: str | os.PathLike) -> str:
    """Write a DataFrame as Parquet (atomically) with a digest of its contents in its metadata."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    digest = table_digest(table)
    # only the digest as metadata: pandas' own (dtypes, index) would be unchecked input
    table = table.replace_schema_metadata({PARQUET_DIGEST_KEY: digest.encode()})
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return digest


def read_parquet(path: str | os.PathLike, rule: str | None = None):
    """Read a file written by :func:`write_parquet`, checking its contents against its digest."""
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(path, "is missing", rule)
    try:
        table = pq.read_table(path)
        stored = (table.schema.metadata or {}).get(PARQUET_DIGEST_KEY)
        actual = table_digest(table)
    except Exception as err:  # noqa: BLE001 - any decoding failure means a damaged file
        raise IntegrityError(path, f"does not decode ({type(err).__name__})", rule) from None
    if stored is None:
        raise IntegrityError(path, "carries no content digest (written before checksums)", rule)
    if stored != actual.encode():
        raise IntegrityError(path, "does not match the content digest stored in it", rule)
    try:
        return table.to_pandas()
    except Exception as err:  # noqa: BLE001
        raise IntegrityError(path, f"does not decode ({type(err).__name__})", rule) from None


# -- reporting -------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[str]:
    """Build a folder under a temporary name beside ``out``; rename it into place only when
    the block completes, so a killed writer never leaves a half-written ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)
    old = None
    if out.exists():  # moved aside, not deleted, until the new folder is in place
        old = tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent)
        os.replace(out, Path(old) / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
