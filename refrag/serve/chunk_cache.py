"""A cache of projected chunk embeddings, keyed by the encoder/projector weights and chunk ids.

RAG corpora repeat passages, and a chunk's embedding depends only on the chunk's token row
and on the encoder + projector weights. :class:`ChunkEmbeddingCache` computes each one once::

    cache = ChunkEmbeddingCache(disk_dir="results/chunk_cache")   # disk_dir is optional
    embeds = cache.encode(model, batch["chunk_input_ids"], batch["chunk_attention_mask"])
    model.use_chunk_cache(cache)      # or let embed_inputs/forward/generate use it

Lookups are vectorised: rows are hashed with numpy (two 64-bit polynomial hashes, verified
against the stored ids), hits are gathered from one device tensor with a single index, and
all misses go through the encoder in one batch. The memory tier is an LRU over
``max_entries`` rows per model; the optional disk tier is one SQLite file per model
fingerprint (WAL mode, usable from any thread; every entry carries a checksum, and a damaged
entry or file is named in a warning, set aside and recomputed). A model's fingerprint is a SHA-256 of its encoder and projector tensors,
recomputed whenever a parameter is modified in place (optimizer steps, ``load_state_dict``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from refrag.modeling import RefragModel

_MULT = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F))


_FINGERPRINT_ATTR = "_refrag_chunk_fingerprint"


_TABLE = "chunks_v2"  # rows carry a checksum (v1 files are ignored, not trusted)


LOG = logging.getLogger(__name__)


def model_fingerprint(model: RefragModel) -> str:
    """SHA-256 (hex) of the encoder + projector weights, memoised until a weight changes."""
    params = [*model.encoder.parameters(), *model.projector.parameters()]
    versions = tuple(p._version for p in params)
    memo = getattr(model, _FINGERPRINT_ATTR, None)
    if memo is not None and memo[0] == versions:
        return memo[1]
    digest = hashlib.sha256()
    digest.update(f"{type(model.encoder).__name__}|{model.config.projector_activation}".encode())
    for prefix, module in (("encoder", model.encoder), ("projector", model.projector)):
        for name, tensor in module.state_dict().items():
            t = tensor.detach().contiguous().cpu()
            digest.update(f"{prefix}.{name}|{t.dtype}|{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    fingerprint = digest.hexdigest()
    object.__setattr__(model, _FINGERPRINT_ATTR, (versions, fingerprint))
    return fingerprint


def row_hashes(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Two independent 64-bit hashes per row of ``(ids, mask)``: ``(N, 2)`` uint64."""
    values = np.where(mask != 0, ids.astype(np.int64) + 1, 0).astype(np.uint64)
    out = np.zeros((values.shape[0], 2), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(2):
            h = np.full(values.shape[0], np.uint64(values.shape[1]), dtype=np.uint64)
            for col in range(values.shape[1]):
                h = (h ^ values[:, col]) * _MULT[j]
                h ^= h >> np.uint64(29)
            out[:, j] = h
    return out


class _Store:
    """The memory tier for one model: an LRU of rows in one ``(capacity, d)`` device tensor."""

    def __init__(self, max_entries: int | None, width: int):
        self.max_entries = max_entries
        self.width = width
        self.slots: OrderedDict[tuple[int, int], int] = OrderedDict()
        self.embeds: torch.Tensor | None = None  # (capacity, d)
        self.ids: torch.Tensor | None = None  # (capacity, 2, W) ids and mask, CPU, for verification
        self.free: list[int] = []

    def __len__(self) -> int:
        return len(self.slots)

    def lookup(self, keys: list[tuple[int, int]]) -> list[int]:
        """Slot per key, or -1; hits become most recently used."""
        out = []
        for key in keys:
            slot = self.slots.get(key, -1)
            if slot >= 0:
                self.slots.move_to_end(key)
            out.append(slot)
        return out

    def insert(self, keys: list[tuple[int, int]], rows: torch.Tensor, embeds: torch.Tensor) -> None:
        n = len(keys)
        if self.max_entries is not None:
            if n > self.max_entries:  # keep the last ones
                keys, rows, embeds = (
                    keys[-self.max_entries :],
                    rows[-self.max_entries :],
                    embeds[-self.max_entries :],
                )
                n = len(keys)
            while len(self.slots) + n > self.max_entries:
                self.free.append(self.slots.popitem(last=False)[1])
        self._reserve(n, embeds)
        slots = [self.free.pop() for _ in range(n)]
        for key, slot in zip(keys, slots):
            self.slots[key] = slot
        index = torch.tensor(slots, dtype=torch.long)
        self.embeds[index.to(self.embeds.device)] = embeds.to(self.embeds.dtype)
        self.ids[index] = rows

    def _reserve(self, n: int, like: torch.Tensor) -> None:
        if len(self.free) >= n:
            return
        old = 0 if self.embeds is None else self.embeds.shape[0]
        new = max(2 * old, old + n - len(self.free), 64)
        if self.max_entries is not None:
            new = min(new, self.max_entries)
        embeds = like.new_empty((new, like.shape[-1]))
        ids = torch.zeros((new, 2, self.width), dtype=torch.long)
        if self.embeds is not None:
            embeds[:old] = self.embeds
            ids[:old] = self.ids
        self.embeds, self.ids = embeds, ids
        self.free.extend(range(new - 1, old - 1, -1))


class ChunkEmbeddingCache:
    """Projected chunk embeddings, computed once per (encoder + projector weights, chunk row).

    Args:
        max_entries: rows kept in memory per model (least recently used go first); ``None``
            keeps everything.
        disk_dir: optional folder for a persistent tier (``<fingerprint>.sqlite`` per model).
        device: where the memory tier lives; default: the projector's device.
    """

    def __init__(
        self,
        max_entries: int | None = 1 << 16,
        disk_dir: str | Path | None = None,
        device: torch.device | str | None = None,
    ):
        self.max_entries = max_entries
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.device = torch.device(device) if device is not None else None
        self._stores: dict[str, _Store] = {}
        self._db: dict[str, sqlite3.Connection] = {}
        self._disk_off: set[str] = set()
        self._lock = threading.RLock()  # chat generates in a worker thread
        self.hits = self.disk_hits = self.misses = self.disk_errors = 0

    def __len__(self) -> int:
        return sum(len(s) for s in self._stores.values())

    def clear(self) -> None:
        """Forget the memory tier (the disk tier stays)."""
        self._stores.clear()
        self.hits = self.disk_hits = self.misses = 0

    def encode(
        self, model: RefragModel, chunk_input_ids: torch.Tensor, chunk_attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Projected embeddings ``(N, decoder_hidden)`` of the chunk rows ``(N, W)``, in order
        (thread-safe; see :meth:`_encode`)."""
        with self._lock:
            return self._encode(model, chunk_input_ids, chunk_attention_mask)

    @torch.inference_mode()
    def _encode(
        self, model: RefragModel, chunk_input_ids: torch.Tensor, chunk_attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Projected embeddings ``(N, decoder_hidden)`` of the chunk rows ``(N, W)``, in order.

        Equal to ``model.encode_chunks(...)``, bitwise when no row was seen before and none
        repeats (the misses then form the same encoder batch); only unseen rows are encoded.
        """
        device = next(model.projector.parameters()).device
        dtype = next(model.projector.parameters()).dtype
        n = chunk_input_ids.shape[0]
        if n == 0:
            return torch.empty((0, model.config.decoder.hidden_size), device=device, dtype=dtype)
        fingerprint = model_fingerprint(model)
        store = self._stores.get(fingerprint)
        if store is None:
            store = self._stores[fingerprint] = _Store(self.max_entries, chunk_input_ids.shape[1])
        rows = torch.stack([chunk_input_ids.cpu(), chunk_attention_mask.cpu()], dim=1).long()
        if rows.shape[2] != store.width:
            raise ValueError(
                f"chunk rows of width {rows.shape[2]}; this cache holds width {store.width}"
            )
        hashes = row_hashes(rows[:, 0].numpy(), rows[:, 1].numpy())
        keys = [tuple(h) for h in hashes.tolist()]
        slots = torch.tensor(store.lookup(keys), dtype=torch.long)
        hit = slots >= 0
        if bool(hit.any()) and not torch.equal(store.ids[slots[hit]], rows[hit]):
            raise RuntimeError("chunk cache hash collision")  # never seen; refuse rather than lie
        if bool(hit.all()):
            self.hits += n
            return store.embeds[slots.to(store.embeds.device, non_blocking=True)].to(device, dtype)

        out = torch.empty((n, model.config.decoder.hidden_size), device=device, dtype=dtype)
        if bool(hit.any()):
            hit_pos = hit.nonzero().squeeze(1)
            out[hit_pos.to(device)] = store.embeds[slots[hit].to(store.embeds.device)].to(
                device, dtype
            )
        miss_pos = (~hit).nonzero().squeeze(1).tolist()
        self.hits += n - len(miss_pos)
        first: dict[tuple[int, int], int] = {}  # unique missing key -> first row holding it
        for pos in miss_pos:
            first.setdefault(keys[pos], pos)
        unique_keys = list(first)
        unique_rows = rows[list(first.values())]
        new_embeds = torch.empty((len(unique_keys), out.shape[1]), device=device, dtype=dtype)
        from_disk = self._disk_get(fingerprint, unique_keys, unique_rows)
        todo = [i for i, e in enumerate(from_disk) if e is None]
        for i, e in enumerate(from_disk):
            if e is not None:
                new_embeds[i] = e.to(device, dtype)
        self.disk_hits += len(unique_keys) - len(todo)
        self.misses += len(todo)
        if todo:
            todo_rows = unique_rows[todo]
            computed = model.encode_chunks(todo_rows[:, 0].to(device), todo_rows[:, 1].to(device))
            new_embeds[torch.tensor(todo, device=device)] = computed.to(dtype)
            self._disk_put(fingerprint, [unique_keys[i] for i in todo], todo_rows, computed)
        index = {key: i for i, key in enumerate(unique_keys)}
        miss_src = torch.tensor([index[keys[p]] for p in miss_pos], device=device)
        out[torch.tensor(miss_pos, device=device)] = new_embeds[miss_src]
        if self.device is not None:
            new_embeds = new_embeds.to(self.device)
        store.insert(unique_keys, unique_rows, new_embeds)
        return out

    # -- disk tier ------------------------------------------------------------------------
    def _connect(self, fingerprint: str) -> sqlite3.Connection | None:
        if self.disk_dir is None or fingerprint in self._disk_off:
            return None
        if fingerprint not in self._db:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            path = self._disk_path(fingerprint)
            try:
                self._db[fingerprint] = _open_db(path)
            except sqlite3.DatabaseError as err:
                self._damaged(fingerprint, err)
                return self._db.get(fingerprint)
        return self._db[fingerprint]

    def _disk_path(self, fingerprint: str) -> Path:
        return self.disk_dir / f"{fingerprint[:32]}.sqlite"

    def _damaged(self, fingerprint: str, err: Exception) -> None:
        """A damaged cache file: set it aside (named in a warning) and start a fresh one; if
        that fails too, go on without the disk tier for this model (recomputing)."""
        self.disk_errors += 1
        path = self._disk_path(fingerprint)
        db = self._db.pop(fingerprint, None)
        if db is not None:
            db.close()
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{path}{suffix}")
            if src.exists():
                os.replace(src, f"{aside}{suffix}")
        LOG.warning(
            "chunk cache file %s is damaged (%s): moved to %s; recomputing", path, err, aside.name
        )
        try:
            self._db[fingerprint] = _open_db(path)
        except sqlite3.DatabaseError as again:
            LOG.warning("chunk cache disk tier off for %s (%s)", path, again)
            self._disk_off.add(fingerprint)

    def _disk_get(
        self, fingerprint: str, keys: list[tuple[int, int]], rows: torch.Tensor
    ) -> list[torch.Tensor | None]:
        db = self._connect(fingerprint)
        if db is None:
            return [None] * len(keys)
        found: list[torch.Tensor | None] = []
        try:
            for key, row in zip(keys, rows):
                rec = db.execute(
                    f"SELECT rows, embed, digest FROM {_TABLE} WHERE h1 = ? AND h2 = ?",
                    _signed(key),
                ).fetchone()
                row_bytes = row.numpy().astype(np.int64).tobytes()
                if rec is None or rec[0] != row_bytes:
                    found.append(None)
                elif _entry_digest(rec[0], rec[1]) != rec[2]:
                    self.disk_errors += 1
                    LOG.warning(
                        "chunk cache file %s: an entry fails its checksum; recomputing it",
                        self._disk_path(fingerprint),
                    )
                    with db:
                        db.execute(f"DELETE FROM {_TABLE} WHERE h1 = ? AND h2 = ?", _signed(key))
                    found.append(None)
                else:
                    found.append(torch.from_numpy(np.frombuffer(rec[1], dtype=np.float32).copy()))
        except sqlite3.DatabaseError as err:
            self._damaged(fingerprint, err)
            return [None] * len(keys)
        return found

    def _disk_put(
        self,
        fingerprint: str,
        keys: list[tuple[int, int]],
        rows: torch.Tensor,
        embeds: torch.Tensor,
    ) -> None:
        db = self._connect(fingerprint)
        if db is None:
            return
        values = embeds.detach().float().cpu().numpy()
        records = []
        for k, r, v in zip(keys, rows, values):
            row_bytes, embed_bytes = r.numpy().astype(np.int64).tobytes(), v.tobytes()
            records.append(
                (*_signed(k), row_bytes, embed_bytes, _entry_digest(row_bytes, embed_bytes))
            )
        try:
            with db:
                db.executemany(f"INSERT OR REPLACE INTO {_TABLE} VALUES (?, ?, ?, ?, ?)", records)
        except sqlite3.DatabaseError as err:
            self._damaged(fingerprint, err)

    def close(self) -> None:
        """Close the disk tier's database connections."""
        with self._lock:
            for db in self._db.values():
                db.close()
            self._db.clear()


def _open_db(path: Path) -> sqlite3.Connection:
    """One cache file: WAL (readers never block the writer), usable from any thread (the
    cache serialises access with its lock), checked with ``PRAGMA quick_check``."""
    db = sqlite3.connect(path, check_same_thread=False, timeout=30)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        status = db.execute("PRAGMA quick_check").fetchone()[0]
        if status != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {status}")
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {_TABLE} (h1 INTEGER, h2 INTEGER, rows BLOB, "
            "embed BLOB, digest BLOB, PRIMARY KEY (h1, h2))"
        )
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def _entry_digest(row_bytes: bytes, embed_bytes: bytes) -> bytes:
    """Checksum of one disk entry: its chunk row and its embedding."""
    return hashlib.sha256(len(row_bytes).to_bytes(8, "little") + row_bytes + embed_bytes).digest()[
        :16
    ]


def _signed(key: tuple[int, int]) -> tuple[int, int]:
    """SQLite integers are signed 64-bit."""
    return tuple(k - (1 << 64) if k >= 1 << 63 else k for k in key)
