"""Fault injection: every artifact is verified before use, and a damaged one is named in one line."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from refrag.cli import one_line_errors
from refrag.data.shards import build_alignment_cache, read_alignment_cache, read_shards
from refrag.io.integrity import (
    MANIFEST,
    IntegrityError,
    atomic_file,
    read_parquet,
    verify_folder,
    write_manifest,
    write_parquet,
)
from refrag.modeling import RefragModel
from refrag.train.runner import save_model_folder

from .conftest import tiny_config


def flip(path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, refrag_tokenizer):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt") / "cpt"
    save_model_folder(
        RefragModel(tiny_config()), refrag_tokenizer, out, extra={"training_log.json": {}}
    )
    return out


# -- folders (checkpoints) --------------------------------------------------------------------
def test_a_saved_checkpoint_verifies_and_lists_every_file(checkpoint):
    verify_folder(checkpoint)
    listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
    assert "model.safetensors" in listed and "training_log.json" in listed
    assert "decoder_tokenizer/tokenizer.json" in listed


@pytest.mark.parametrize(
    "damage, problem",
    [
        (
            lambda p: flip(
                p / "model.safetensors", p.joinpath("model.safetensors").stat().st_size // 2
            ),
            "checksum",
        ),
        (lambda p: (p / "model.safetensors").write_bytes(b"partial"), "bytes"),
        (lambda p: (p / "config.json").unlink(), "missing"),
        (lambda p: (p / MANIFEST).unlink(), f"no {MANIFEST}"),
        (lambda p: (p / MANIFEST).write_text(""), "damaged"),
    ],
    ids=["flipped-weight", "truncated", "missing-file", "no-manifest", "empty-manifest"],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file(checkpoint, tmp_path, damage, problem):
    copy = tmp_path / "cpt"
    shutil.copytree(checkpoint, copy)
    damage(copy)
    with pytest.raises(IntegrityError, match=problem) as err:
        verify_folder(copy, rule="train")
    assert str(copy) in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).endswith("rerun rule train")


def test_every_checkpoint_reader_verifies_before_loading(checkpoint, shards, tmp_path):
    from refrag.eval.perplexity import evaluate_windows
    from refrag.serve.inference import load_refrag
    from refrag.train.runner import train_stage

    copy = tmp_path / "cpt"
    shutil.copytree(checkpoint, copy)
    flip(copy / "model.safetensors", copy.joinpath("model.safetensors").stat().st_size - 10)
    with pytest.raises(IntegrityError, match="model.safetensors"):
        load_refrag(copy, device="cpu")
    with pytest.raises(IntegrityError, match="model.safetensors"):
        evaluate_windows(shards=str(shards), out=str(tmp_path / "e.json"), checkpoint=str(copy))
    with pytest.raises(IntegrityError, match="model.safetensors"):
        train_stage("cpt", init=copy, data=shards, out=tmp_path / "next", compression=4, hp={})
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "next").exists()


# -- shards ---------------------------------------------------------------------------------
def test_a_flipped_shard_byte_is_named(shards, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(shards, copy)
    flip(copy / "shard-00001.parquet", 100)
    with pytest.raises(IntegrityError, match="shard-00001.parquet: does not match") as err:
        read_shards(copy, rule="tokenize")
    assert str(err.value).endswith("rerun rule tokenize")


def test_a_damaged_shard_manifest_is_named(shards, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(shards, copy)
    (copy / "manifest.json").write_text("")
    with pytest.raises(IntegrityError, match="manifest.json: is damaged"):
        read_shards(copy)


# -- the alignment cache and other single Parquet files --------------------------------------
def test_random_byte_flips_in_the_alignment_cache_never_pass_silently(
    shards, decoder_tokenizer, encoder_tokenizer, tmp_path
):
    cache = tmp_path / "train.parquet"
    build_alignment_cache(
        read_shards(shards),
        encoder_tokenizer=encoder_tokenizer,
        decoder_tokenizer=decoder_tokenizer,
        out=cache,
    )
    intact = read_alignment_cache(cache)
    pristine = cache.read_bytes()
    rng = random.Random(0)
    refused = 0
    for pos in rng.sample(range(len(pristine)), 150):
        cache.write_bytes(pristine)
        flip(cache, pos)
        try:
            got = read_alignment_cache(cache)
        except IntegrityError as err:
            assert str(cache) in str(err)
            refused += 1
            continue
        pd.testing.assert_frame_equal(got, intact)  # a flip it survives changed no value
    assert refused > 100


def test_a_parquet_written_without_a_digest_is_refused(tmp_path):
    pd.DataFrame({"a": [1, 2]}).to_parquet(tmp_path / "plain.parquet")
    with pytest.raises(IntegrityError, match="no content digest"):
        read_parquet(tmp_path / "plain.parquet")


def test_parquet_digest_round_trips_lists_text_and_floats(tmp_path):
    frame = pd.DataFrame({"ids": [[1, 2], [], [3]], "text": ["a", "é", ""], "x": [0.5, 1.0, -2.0]})
    write_parquet(frame, tmp_path / "f.parquet")
    pd.testing.assert_frame_equal(read_parquet(tmp_path / "f.parquet"), frame)


# -- atomic writes and one-line reports --------------------------------------------------------
def test_an_interrupted_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_file(target) as tmp:
        Path(tmp).write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_manifest_is_written_after_the_files_and_skips_itself(tmp_path):
    (tmp_path / "a").write_text("x")
    write_manifest(tmp_path)
    write_manifest(tmp_path)  # rewriting does not list the manifest itself
    assert list(json.loads((tmp_path / MANIFEST).read_text())["files"]) == ["a"]


def test_one_line_errors_name_the_rule_of_the_input_holding_the_file(tmp_path):
    damaged = tmp_path / "shards" / "shard-00000.parquet"
    rules = {tmp_path / "other": "x", tmp_path / "shards": "tokenize"}
    with pytest.raises(SystemExit) as exit_, one_line_errors(rules):
        raise IntegrityError(damaged, "does not match the checksum in its manifest")
    message = str(exit_.value.code)
    assert (
        message
        == f"error: {damaged}: does not match the checksum in its manifest; rerun rule tokenize"
    )


def test_a_damaged_init_ends_the_training_command_with_one_line(checkpoint, shards, tmp_path):
    copy = tmp_path / "align"
    shutil.copytree(checkpoint, copy)
    (copy / "model.safetensors").write_bytes(b"")
    cmd = [sys.executable, "-m", "refrag.cli", "train", "--stage", "cpt", "--k", "4"]
    cmd += ["--init", str(copy), "--data", str(shards), "--out", str(tmp_path / "cpt")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {copy / 'model.safetensors'}")
    assert "Traceback" not in done.stderr
