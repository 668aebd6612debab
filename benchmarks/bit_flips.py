"""Flip one random bit of an artifact, many times, and count how its reader reacts.

    .venv/bin/python benchmarks/bit_flips.py [--flips 300]

Artifacts: a corpus split (checked against its manifest), a shard, the alignment cache
(content digest), built from a fixed text (transformers' pinned LLaMA source) with the default
embedded tokenizers. A reader may
refuse the file (IntegrityError) or return exactly the intact contents; "accepted altered"
must be 0.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import pandas as pd
from transformers import AutoTokenizer

from refrag.data.corpus import prepare_corpus, read_split
from refrag.data.shards import (
    build_alignment_cache,
    iter_windows,
    read_alignment_cache,
    read_shards,
    write_shards,
)
from refrag.io.integrity import IntegrityError
from refrag.io.models import DEFAULT_DECODER, DEFAULT_ENCODER, resolve_model


def trial(path: Path, read, flips: int, seed: int = 0) -> dict:
    intact, raw = read(), path.read_bytes()
    rng = random.Random(seed)
    counts = {"refused": 0, "unchanged": 0, "accepted altered": 0}
    for pos in rng.sample(range(len(raw)), min(flips, len(raw))):
        data = bytearray(raw)
        data[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        try:
            got = read()
        except IntegrityError:
            counts["refused"] += 1
            continue
        try:
            pd.testing.assert_frame_equal(got, intact)
            counts["unchanged"] += 1
        except AssertionError:
            counts["accepted altered"] += 1
    path.write_bytes(raw)
    return {"bytes": len(raw), **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flips", type=int, default=300)
    args = parser.parse_args()
    dec = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_DECODER))
    enc = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_ENCODER))
    import transformers.models.llama.modeling_llama as source

    text = Path(source.__file__).read_text()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    docs = [{"doc_id": f"p{i}", "title": "", "text": p} for i, p in enumerate(paragraphs)]
    tmp = Path(tempfile.mkdtemp())
    prepare_corpus(docs, tmp / "corpus", validation_fraction=0.2, test_fraction=0.2)
    write_shards(
        list(
            iter_windows(
                [{"doc_id": "llama", "text": text}],
                encoder_tokenizer=enc,
                decoder_tokenizer=dec,
                context_tokens=256,
                target_tokens=64,
            )
        ),
        tmp / "shards",
        metadata={},
    )
    build_alignment_cache(
        read_shards(tmp / "shards"),
        encoder_tokenizer=enc,
        decoder_tokenizer=dec,
        out=tmp / "align.parquet",
    )
    split = tmp / "corpus" / "train.parquet"
    shard = tmp / "shards" / "shard-00000.parquet"
    for name, path, read in [
        ("corpus split", split, lambda: read_split(split)),
        ("shard", shard, lambda: read_shards(tmp / "shards")),
        (
            "alignment cache",
            tmp / "align.parquet",
            lambda: read_alignment_cache(tmp / "align.parquet"),
        ),
    ]:
        print(f"{name:<16} {trial(path, read, args.flips)}", flush=True)


if __name__ == "__main__":
    main()
