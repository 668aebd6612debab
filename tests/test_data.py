import json
import shutil

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refrag.data.shards import iter_windows, read_shards, spread


def test_windows_hold_both_tokenizations_of_the_same_context(
    shards, encoder_tokenizer, decoder_tokenizer
):
    windows = read_shards(shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["rows"] == len(windows) and len(manifest["shards"]) > 1
    row = windows.iloc[0]
    assert len(row["context_ids"]) == 32 and len(row["target_ids"]) == 8
    assert decoder_tokenizer.decode(row["context_ids"]) == row["context_text"]
    assert (
        list(row["context_encoder_ids"])
        == encoder_tokenizer(row["context_text"], add_special_tokens=False)["input_ids"]
    )
    assert row["context_encoder_ends"][-1] == len(row["context_text"])


def test_corrupt_shard_is_refused(shards, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(shards, copy)
    (copy / "shard-00000.parquet").write_bytes(b"broken")
    with pytest.raises(ValueError, match="checksum"):
        read_shards(copy)


def test_alignment_cache_pairs_tokens_covering_the_same_text(
    alignment_cache, shards, encoder_tokenizer, decoder_tokenizer
):
    rows = pd.read_parquet(alignment_cache).to_dict("records")
    windows = read_shards(shards)
    assert len(rows) == len(windows)
    row, text = rows[0], windows.iloc[0]["context_text"]
    assert list(row["decoder_ids"]) == list(windows.iloc[0]["context_ids"])
    assert len(row["decoder_index"]) == len(row["encoder_index"]) > 0
    ends = {
        name: [
            end
            for _, end in tok(text, add_special_tokens=False, return_offsets_mapping=True)[
                "offset_mapping"
            ]
        ]
        for name, tok in (("decoder", decoder_tokenizer), ("encoder", encoder_tokenizer))
    }
    for d, e in zip(row["decoder_index"], row["encoder_index"]):  # both end at one character
        assert ends["decoder"][d] == ends["encoder"][e]


def test_encoder_text_stops_before_a_character_split_with_the_target(
    encoder_tokenizer, decoder_tokenizer
):
    """A byte-level token can end inside a multi-byte character ("″": 'ĠâĢ' + '³') whose last
    byte is the target's first token: the encoder must not read that character."""
    text = "The song ″Arthur″ was a hit in the charts of that year."
    enc = decoder_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    split = next(i for i in range(1, len(offsets)) if offsets[i - 1][1] > offsets[i][0])
    (row,) = iter_windows(
        [{"doc_id": "d", "text": text}],
        encoder_tokenizer=encoder_tokenizer,
        decoder_tokenizer=decoder_tokenizer,
        context_tokens=split,
        target_tokens=len(offsets) - split,
    )
    assert row["context_text"] == "The song "  # the split token's space, not its character
    assert "″" not in encoder_tokenizer.decode(row["context_encoder_ids"])
    assert list(row["target_ids"]) == enc["input_ids"][split:]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    words=st.lists(
        st.sampled_from(["a", "Zoë", "″x", "日本", "€5", "🙂", " ", "naïve", "—"]),
        min_size=4,
        max_size=40,
    ),
    context=st.integers(1, 6),
    target=st.integers(1, 4),
)
def test_encoder_text_never_reaches_the_target(
    words, context, target, encoder_tokenizer, decoder_tokenizer
):
    text = " ".join(words)
    offsets = decoder_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    rows = iter_windows(
        [{"doc_id": "d", "text": text}],
        encoder_tokenizer=encoder_tokenizer,
        decoder_tokenizer=decoder_tokenizer,
        context_tokens=context,
        target_tokens=target,
    )
    for n, row in enumerate(rows):
        context_start = offsets[n * (context + target)][0]
        target_start = offsets[n * (context + target) + context][0]
        assert text[context_start:].startswith(row["context_text"])
        assert context_start + len(row["context_text"]) <= target_start


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=15), limit=st.integers(1, 200))
def test_spread_keeps_every_document_the_limit_allows(sizes, limit):
    rows = [{"doc_id": f"d{d}", "window": w} for d, n in enumerate(sizes) for w in range(n)]
    picked = spread(rows, limit)
    keys = [(r["doc_id"], r["window"]) for r in picked]
    assert len(picked) == min(limit, len(rows)) and len(set(keys)) == len(keys)
    assert keys == sorted(keys, key=lambda k: (int(k[0][1:]), k[1]))  # list order kept
    assert len({r["doc_id"] for r in picked}) == min(limit, len(sizes))
    if len(sizes) <= limit < len(rows):  # one each, the rest in proportion (within one)
        for d, n in enumerate(sizes):
            share = 1 + (n - 1) * (limit - len(sizes)) / (len(rows) - len(sizes))
            assert abs(sum(k[0] == f"d{d}" for k in keys) - share) < 1
