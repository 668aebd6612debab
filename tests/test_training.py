import json

import pandas as pd
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from refrag.data import build_alignment_cache, iter_windows, read_shards, write_shards
from refrag.evaluation import context_benefit_retained, perplexity_table, target_nll
from refrag.modeling import RefragModel
from refrag.tokenization import IGNORE_INDEX, RefragTokenizer
from refrag.training import (
    AlignmentCollator,
    RefragTrainer,
    StageConfig,
    alignment_losses,
    last_complete_checkpoint,
    reconstruction_examples,
    train_stage,
)

from .conftest import tiny_config

TEXT = (
    "The Analytical Engine was a proposed mechanical general-purpose computer designed by "
    "English mathematician and computer pioneer Charles Babbage. It was first described in 1837 "
    "as the successor to Babbage's difference engine. The Analytical Engine incorporated an "
    "arithmetic logic unit, control flow in the form of conditional branching and loops, and "
    "integrated memory, making it the first design for a general-purpose computer. "
) * 4


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, decoder_dir, encoder_dir):
    root = tmp_path_factory.mktemp("tiny")
    config = tiny_config()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config.decoder).save_pretrained(root / "dec")
    AutoModel.from_config(config.encoder).save_pretrained(root / "enc")
    AutoTokenizer.from_pretrained(decoder_dir).save_pretrained(root / "dec")
    AutoTokenizer.from_pretrained(encoder_dir).save_pretrained(root / "enc")
    return root / "enc", root / "dec"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, decoder_tokenizer, encoder_tokenizer):
    docs = [{"doc_id": f"d{i}", "title": "", "text": TEXT[i * 7 :]} for i in range(4)]
    rows = list(iter_windows(docs, decoder_tokenizer, encoder_tokenizer, 32, 8))
    out = tmp_path_factory.mktemp("shards") / "train"
    write_shards(rows, out, metadata={}, shard_rows=5)
    return out


def test_windows_hold_both_tokenizations_of_the_same_context(
    shards, decoder_tokenizer, encoder_tokenizer
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
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(shards, copy)
    (copy / "shard-00000.parquet").write_bytes(b"broken")
    with pytest.raises(ValueError, match="checksum"):
        read_shards(copy)


def test_reconstruction_curriculum_grows_and_targets_the_covered_text(shards, refrag_tokenizer):
    windows = read_shards(shards)
    examples = reconstruction_examples(windows, refrag_tokenizer, curriculum=[1, 2, 4], total=20)
    chunks = [sum(e["chunk_mask"]) for e in examples]
    assert chunks == sorted(chunks) and chunks[0] == 1 and chunks[-1] == 4
    first = examples[0]
    labelled = [i for i, keep in zip(first["input_ids"], first["label_mask"]) if keep]
    row = windows.iloc[0]
    covered = row["context_text"][: row["context_encoder_ends"][refrag_tokenizer.compression - 1]]
    assert refrag_tokenizer.decoder_tokenizer.decode(labelled) == covered


def test_alignment_losses_are_batched_over_all_pairs(
    shards, tiny_model, refrag_tokenizer, decoder_tokenizer, encoder_tokenizer, tmp_path
):
    build_alignment_cache(
        read_shards(shards), decoder_tokenizer, encoder_tokenizer, tmp_path / "a.parquet"
    )
    rows = pd.read_parquet(tmp_path / "a.parquet").to_dict("records")[:3]
    batch = AlignmentCollator(refrag_tokenizer)(rows)
    assert len(batch["pair_batch"]) == sum(len(r["decoder_index"]) for r in rows) > 0
    calls = []
    tiny_model.decoder.register_forward_hook(lambda *a: calls.append(1))
    losses = alignment_losses(tiny_model, **batch)
    assert set(losses) == {"mse", "kld", "argmax"} and all(
        torch.isfinite(v) for v in losses.values()
    )
    assert calls == []  # no decoder pass: targets are embedding rows


def test_stage_writes_a_loadable_model_folder_with_its_log(tiny_dirs, shards, tmp_path):
    out = tmp_path / "reconstruct"
    train_stage(
        "reconstruct",
        init=tiny_dirs,
        data=shards,
        out=out,
        compression=4,
        hp={"steps": 3, "batch_size": 2, "curriculum": [1, 2], "logging_steps": 1},
    )
    model = RefragModel.from_pretrained(out)
    assert model.config.compression == 4 and not model.config.train_decoder
    assert RefragTokenizer.from_pretrained(out).compression == 4
    log = json.loads((out / "training_log.json").read_text())
    assert log["stage"] == "reconstruct" and [
        e["step"] for e in log["log_history"] if "loss" in e
    ] == [1, 2, 3]
    assert not out.with_name("reconstruct.work").exists()


def test_align_stage_trains_only_the_projector(
    tiny_dirs, shards, decoder_tokenizer, encoder_tokenizer, tmp_path
):
    cache = tmp_path / "pairs.parquet"
    build_alignment_cache(read_shards(shards), decoder_tokenizer, encoder_tokenizer, cache)
    out = tmp_path / "align"
    hp = {
        "steps": 2,
        "batch_size": 2,
        "lr": 1e-2,
        "max_pairs": 16,
        "train_encoder": False,
        "logging_steps": 1,
    }
    train_stage("align", init=tiny_dirs, data=cache, out=out, compression=4, hp=hp)
    model = RefragModel.from_pretrained(out)
    encoder = AutoModel.from_pretrained(tiny_dirs[0]).state_dict()
    assert all(torch.equal(encoder[k], v) for k, v in model.encoder.state_dict().items())
    log = json.loads((out / "training_log.json").read_text())["log_history"]
    assert any("align_mse" in e and "align_kld" in e and "align_argmax" in e for e in log)


def test_frozen_decoder_is_unchanged_by_training(tiny_dirs, shards, tmp_path):
    out = tmp_path / "cpt"
    train_stage(
        "cpt",
        init=tiny_dirs,
        data=shards,
        out=out,
        compression=4,
        hp={"steps": 2, "batch_size": 2, "lr": 1e-2},
    )
    before = AutoModelForCausalLM.from_pretrained(tiny_dirs[1]).state_dict()
    after = RefragModel.from_pretrained(out).decoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_interrupted_stage_resumes_from_its_last_complete_checkpoint(
    tiny_dirs, shards, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "cpt"
    hp = {"steps": 4, "batch_size": 2, "save_steps": 2, "logging_steps": 1}
    real_step = RefragTrainer.training_step

    def failing_step(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(RefragTrainer, "training_step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        train_stage("cpt", init=tiny_dirs, data=shards, out=out, compression=4, hp=hp)
    work = tmp_path / "cpt.work"
    assert not out.exists() and last_complete_checkpoint(work).endswith("checkpoint-2")
    (work / "checkpoint-3").mkdir()  # a save that was killed: no trainer_state.json
    (work / "checkpoint-3" / "model.safetensors").write_bytes(b"partial")

    monkeypatch.setattr(RefragTrainer, "training_step", real_step)
    train_stage("cpt", init=tiny_dirs, data=shards, out=out, compression=4, hp=hp)
    assert "resuming cpt from" in capsys.readouterr().out
    steps = [
        e["step"]
        for e in json.loads((out / "training_log.json").read_text())["log_history"]
        if "loss" in e
    ]
    assert steps == [1, 2, 3, 4]
    RefragModel.from_pretrained(out)


def test_stage_config_rejects_unknown_hyperparameters():
    with pytest.raises(TypeError):
        StageConfig(stepz=3)


def test_target_nll_counts_only_target_tokens(shards, tiny_model, refrag_tokenizer):
    windows = read_shards(shards).to_dict("records")[:3]
    for variant in ("no_context", "full_context"):
        total, count = target_nll(
            tiny_model.decoder, refrag_tokenizer, windows, variant, batch_size=2
        )
        assert count == 3 * 8 and total > 0
    total, count = target_nll(tiny_model, refrag_tokenizer, windows, "refrag", batch_size=2)
    assert count == 3 * 8


def test_perplexity_table_computes_context_benefit_retained():
    base = {"decoder": "d", "encoder": "e", "eval_set": "test"}
    rows = [
        base | {"variant": "no_context", "k": None, "stage": None, "log_ppl": 3.0},
        base | {"variant": "full_context", "k": None, "stage": None, "log_ppl": 2.0},
        base | {"variant": "refrag", "k": 16, "stage": "cpt", "log_ppl": 2.25},
        base | {"variant": "refrag", "k": 16, "stage": "reconstruct", "log_ppl": 3.0},
    ]
    table = perplexity_table(rows, final_stage="cpt").set_index("variant")
    assert list(table.columns[:4]) == ["k", "eval_set", "log_ppl", "context_benefit_retained"]
    assert table.loc["refrag", "context_benefit_retained"] == pytest.approx(0.75)
    assert table.loc["refrag_reconstruct", "context_benefit_retained"] == pytest.approx(0.0)
    assert table.loc["full_context", "context_benefit_retained"] == pytest.approx(1.0)
    assert context_benefit_retained(1.062, 1.254, 1.069) == pytest.approx(1.038, abs=1e-3)
    assert IGNORE_INDEX == -100


def test_target_nll_matches_a_direct_computation(shards, tiny_model, refrag_tokenizer):
    import torch.nn.functional as F

    windows = read_shards(shards).to_dict("records")[:2]
    total, count = target_nll(
        tiny_model.decoder, refrag_tokenizer, windows, "full_context", batch_size=2
    )
    expected = 0.0
    for row in windows:
        ids = torch.tensor(
            [[refrag_tokenizer.bos_token_id, *row["context_ids"], *row["target_ids"]]]
        )
        logits = tiny_model.decoder(input_ids=ids).logits[0, :-1]
        n = len(row["target_ids"])
        expected += F.cross_entropy(logits[-n:], ids[0, -n:], reduction="sum").item()
    assert count == 16 and total == pytest.approx(expected, rel=1e-4)


def test_alignment_collator_caps_the_pairs_per_batch(
    shards, refrag_tokenizer, decoder_tokenizer, encoder_tokenizer, tmp_path
):
    build_alignment_cache(
        read_shards(shards), decoder_tokenizer, encoder_tokenizer, tmp_path / "a.parquet"
    )
    rows = pd.read_parquet(tmp_path / "a.parquet").to_dict("records")[:3]
    batch = AlignmentCollator(refrag_tokenizer, max_pairs=10)(rows)
    assert len(batch["pair_batch"]) == len(batch["pair_decoder_ids"]) == 10
    assert batch["pair_batch"].tolist() == sorted(batch["pair_batch"].tolist())


@pytest.mark.slow
def test_a_stage_trains_under_torchrun_with_two_processes(tiny_dirs, shards, tmp_path):
    """The GPU rules' launch path, on CPU: torchrun, gloo, one log per rank, one output."""
    import subprocess
    import sys

    out, ranks = tmp_path / "cpt", tmp_path / "ranks"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "refrag.training",
        "--stage",
        "cpt",
        "--k",
        "4",
        "--init",
        str(tiny_dirs[0]),
        str(tiny_dirs[1]),
        "--data",
        str(shards),
        "--out",
        str(out),
        "--hp",
        json.dumps({"steps": 2, "batch_size": 2}),
        "--rank-log-dir",
        str(ranks),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert sorted(p.name for p in ranks.iterdir()) == ["run-0.log", "run-1.log"]
    assert RefragModel.from_pretrained(out).config.compression == 4
    log = json.loads((out / "training_log.json").read_text())
    assert log["metrics"]["train_samples_per_second"] > 0 and log["log_history"][-1]["step"] == 2
