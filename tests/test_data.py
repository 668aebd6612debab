import json
import shutil

import pandas as pd
import pytest

from refrag.data import read_shards


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
