"""The chunk cache's disk tier: checksummed entries, damaged files set aside, any thread."""

from __future__ import annotations

import sqlite3
import threading

import pytest
import torch

from refrag.modeling import RefragModel
from refrag.serve.chunk_cache import ChunkEmbeddingCache

from .conftest import tiny_config


@pytest.fixture(scope="module")
def model() -> RefragModel:
    torch.manual_seed(0)
    return RefragModel(tiny_config()).eval()


def rows(n: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, 6), generator=g)
    return ids, torch.ones_like(ids)


def db_file(tmp_path):
    (path,) = tmp_path.glob("*.sqlite")
    return path


def test_a_flipped_embedding_in_the_disk_tier_is_recomputed_and_named(model, tmp_path, caplog):
    ids, mask = rows()
    want = model.encode_chunks(ids, mask).detach()
    first = ChunkEmbeddingCache(disk_dir=tmp_path)
    first.encode(model, ids, mask)
    first.close()
    with sqlite3.connect(db_file(tmp_path)) as db:  # flip one byte of one stored embedding
        rowid, embed = db.execute("SELECT rowid, embed FROM chunks_v2 LIMIT 1").fetchone()
        damaged = bytearray(embed)
        damaged[5] ^= 0x40
        db.execute("UPDATE chunks_v2 SET embed = ? WHERE rowid = ?", (bytes(damaged), rowid))
    second = ChunkEmbeddingCache(disk_dir=tmp_path)
    got = second.encode(model, ids, mask)
    assert torch.allclose(got, want, atol=1e-6)
    assert (second.disk_hits, second.misses, second.disk_errors) == (4, 1, 1)
    assert str(db_file(tmp_path)) in caplog.text and "checksum" in caplog.text
    second.close()
    third = ChunkEmbeddingCache(disk_dir=tmp_path)  # the recomputed entry was stored again
    third.encode(model, ids, mask)
    assert (third.disk_hits, third.disk_errors) == (5, 0)
    third.close()


def test_a_damaged_cache_file_is_set_aside_and_the_cache_goes_on(model, tmp_path, caplog):
    ids, mask = rows()
    cache = ChunkEmbeddingCache(disk_dir=tmp_path)
    cache.encode(model, ids, mask)
    cache.close()
    path = db_file(tmp_path)
    path.write_bytes(b"this is not a database" * 100)
    fresh = ChunkEmbeddingCache(disk_dir=tmp_path)
    got = fresh.encode(model, ids, mask)
    assert torch.allclose(got, model.encode_chunks(ids, mask).detach(), atol=1e-6)
    assert fresh.disk_errors == 1 and fresh.misses == 5
    assert str(path) in caplog.text and "damaged" in caplog.text
    assert any(p.name.startswith(path.name + ".damaged-") for p in tmp_path.iterdir())
    fresh.close()
    again = ChunkEmbeddingCache(disk_dir=tmp_path)  # the new file works
    again.encode(model, ids, mask)
    assert again.disk_hits == 5
    again.close()


def test_the_disk_tier_is_usable_from_other_threads_in_wal_mode(model, tmp_path):
    cache = ChunkEmbeddingCache(disk_dir=tmp_path)
    cache.encode(model, *rows(3, seed=1))  # connection opened on this thread
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            cache.clear()
            cache.encode(model, *rows(4, seed=seed))
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with sqlite3.connect(db_file(tmp_path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cache.close()
