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

A model folder is data, never code: :func:`refuse_code` refuses one whose JSON files map a class
to code (``auto_map``) or whose pickle files hold more than tensors (:class:`UnsafeFolderError`).
A full disk while writing ends in one line too (:func:`disk_full_guard`, :class:`DiskFullError`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

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


# -- untrusted folders -----------------------------------------------------------------------
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class UnsafeFolderError(ValueError):
    """A model folder that would run code when loaded: ``path`` and why, in one line."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{self.path}: {problem}; refused (a model folder is never run as code)")


def _auto_map(content: object) -> object:
    """The first ``auto_map`` value anywhere in a parsed JSON document, else ``None``."""
    if isinstance(content, dict):
        if content.get("auto_map"):
            return content["auto_map"]
        content = list(content.values())
    if isinstance(content, list):
        for item in content:
            if (found := _auto_map(item)) is not None:
                return found
    return None


def check_pickle(path: str | os.PathLike) -> None:
    """Raise :class:`UnsafeFolderError` unless a torch pickle file loads with
    ``weights_only=True`` (tensors and plain containers; no object is ever constructed)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "not weights only"
        raise UnsafeFolderError(path, f"holds a pickle payload beyond tensors ({first})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise UnsafeFolderError(path, f"does not load as weights ({type(err).__name__})") from None


def refuse_code(folder: str | os.PathLike) -> None:
    """Raise :class:`UnsafeFolderError` if loading ``folder`` could run code from it: a JSON
    file (``config.json``, ``tokenizer_config.json`` …, sub-folders included) with an
    ``auto_map``, or a pickle file (``*.bin``, ``*.pth`` …) that is not weights only.
    A path that is not a folder (a hub name) is left to the loader (``trust_remote_code=False``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in (p for p in files if p.suffix == ".json" and p.name != MANIFEST):
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # not ours to judge: the loader names a broken file
        if (target := _auto_map(content)) is not None:
            shown = json.dumps(target)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise UnsafeFolderError(path, f"maps classes to code in the folder (auto_map {shown})")
    for path in (p for p in files if p.suffix in PICKLE_SUFFIXES):
        check_pickle(path)


# -- full disks ------------------------------------------------------------------------------
_DISK_FULL_TEXT = ("no space left on device", "storagefull", "disk quota exceeded")


class DiskFullError(OSError):
    """A write that ran out of space: where, and how much is free there, in one line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        free = _free_bytes(self.path)
        shown = "unknown" if free is None else f"{free / 2**20:,.0f} MiB"
        super().__init__(
            errno.ENOSPC,
            f"{self.path}: no space left on the device while writing ({shown} free there); "
            "free some space and rerun (a training run resumes from its last complete checkpoint)",
        )

    def __str__(self) -> str:
        return self.strerror


def _free_bytes(path: Path) -> int | None:
    for where in (path, *path.absolute().parents):
        if where.exists():
            try:
                return shutil.disk_usage(where).free
            except OSError:
                return None
    return None


def is_disk_full(err: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether ``err`` (an ``OSError`` with ENOSPC/EDQUOT, or a library's wrapped one, such as
    safetensors' ``StorageFull``) means the disk is full; torch.save's "file write failed"
    (which hides the errno) counts when under 64 MiB are free at ``path``."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    if any(t in text for t in _DISK_FULL_TEXT):
        return True
    if "file write failed" in text and path is not None:
        free = _free_bytes(Path(path))
        return free is not None and free < 64 * 2**20
    return False


@contextlib.contextmanager
def disk_full_guard(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full-disk failure inside the block (writing under ``path``) into
    :class:`DiskFullError`, one line naming ``path`` and its free space."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if is_disk_full(err, path):
            where = getattr(err, "filename", None) or path
            raise DiskFullError(where) from None
        raise


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
