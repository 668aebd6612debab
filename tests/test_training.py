import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from refrag.cli import main
from refrag.data.shards import read_shards
from refrag.modeling import RefragModel
from refrag.modeling.tokenization import RefragTokenizer
from refrag.train.datasets import (
    AlignmentCollator,
    aligned_spans,
    curriculum_lengths,
    reconstruction_examples,
    shuffled_cycle,
)
from refrag.train.launch import ParallelError
from refrag.train.resume import last_complete_checkpoint
from refrag.train.runner import train_stage
from refrag.train.stages import STAGES
from refrag.train.trainers import RefragTrainer, alignment_losses

from .conftest import TEXT, interrupt_at_step


@pytest.fixture
def base(tiny_model_dirs):
    """train_stage's arguments that start a stage from the tiny base models."""
    return {"encoder": tiny_model_dirs["encoder"], "decoder": tiny_model_dirs["decoder"]}


def test_curriculum_phases_mix_lengths_and_reach_the_longest():
    lengths = curriculum_lengths([1, 2, 4, 8], total=400, seed=0)
    phases = [lengths[i * 100 : (i + 1) * 100] for i in range(4)]
    assert set(phases[0]) == {1} and set(phases[-1]) == {1, 2, 4, 8}
    assert all(max(p) <= cap for p, cap in zip(phases, [1, 2, 4, 8]))
    assert curriculum_lengths([1, 2, 4, 8], total=400, seed=0) == lengths  # seeded


def test_reconstruction_targets_the_covered_text_of_windows_in_random_order(
    shards, refrag_tokenizer
):
    windows = read_shards(shards)
    examples = reconstruction_examples(windows, refrag_tokenizer, curriculum=[1], total=4, seed=3)
    first = examples[0]
    labelled = [i for i, keep in zip(first["input_ids"], first["label_mask"]) if keep]
    texts = [
        row["context_text"][: row["context_encoder_ends"][refrag_tokenizer.compression - 1]]
        for _, row in windows.iterrows()
    ]
    assert refrag_tokenizer.decoder_tokenizer.decode(labelled) in texts
    assert sum(first["chunk_mask"]) == 1


def test_long_curriculum_entries_read_the_whole_context(shards, refrag_tokenizer):
    windows = read_shards(shards)
    (example,) = reconstruction_examples(windows, refrag_tokenizer, [10_000], total=1)
    k = refrag_tokenizer.compression
    assert sum(example["chunk_mask"]) in {
        -(-len(ids) // k) for ids in windows["context_encoder_ids"]
    }


def test_shuffled_cycle_reads_every_item_once_per_pass():
    order = shuffled_cycle(5, 12, seed=0)
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5)) and len(order) == 12
    assert order[:5] != order[5:10] or order[5:10] != order[:5]


def test_alignment_pairs_are_single_token_spans_read_as_chunks(
    alignment_cache, tiny_model, refrag_tokenizer
):
    rows = pd.read_parquet(alignment_cache).to_dict("records")[:3]
    batch = AlignmentCollator(refrag_tokenizer)(rows)
    spans = [s for r in rows for s in aligned_spans(r, refrag_tokenizer.compression)]
    assert len(batch["pair_decoder_ids"]) == len(spans) == len(batch["chunk_input_ids"]) > 0
    cls = refrag_tokenizer.encoder_tokenizer.cls_token_id
    assert (batch["chunk_input_ids"][:, 0] == cls).all()  # read as the model reads context
    for span, token in spans[:20]:  # each span decodes to its one decoder token
        enc = refrag_tokenizer.encoder_tokenizer.decode(span).replace(" ", "")
        dec = refrag_tokenizer.decoder_tokenizer.decode([token]).strip().lower().replace(" ", "")
        assert enc.replace("##", "") == dec
    calls = []
    tiny_model.decoder.register_forward_hook(lambda *a: calls.append(1))
    tiny_model.decoder.get_input_embeddings().weight.requires_grad_(True)
    losses = alignment_losses(tiny_model, **batch)
    assert set(losses) == {"mse", "kld", "argmax"} and all(
        torch.isfinite(v) for v in losses.values()
    )
    assert calls == []  # no decoder pass: targets are embedding rows
    sum(losses.values()).backward()
    assert tiny_model.decoder.get_input_embeddings().weight.grad is None  # targets detached
    assert tiny_model.projector.fc2.weight.grad is not None


def test_gradient_accumulation_averages_the_loss_over_tokens(base, shards, tmp_path):
    """Same examples, accumulation 1, 2 and 4: the same logged loss (not 2× and 4×)."""
    losses = []
    for accum in (1, 2, 4):
        out = tmp_path / f"cpt{accum}"
        hp = {"steps": 1, "batch_size": 1, "grad_accum": accum, "lr": 1e-9, "logging_steps": 1}
        train_stage("cpt", **base, data=shards, out=out, compression=4, hp=hp | {"seed": 1})
        log = json.loads((out / "training_log.json").read_text())["log_history"]
        losses.append(next(e["loss"] for e in log if "loss" in e))
    assert max(losses) < 1.5 * min(losses), losses


def test_stage_writes_a_loadable_model_folder_with_its_log(base, shards, tmp_path):
    out = tmp_path / "reconstruct"
    train_stage(
        "reconstruct",
        **base,
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


def test_align_stage_trains_only_the_projector(base, alignment_cache, tmp_path):
    out = tmp_path / "align"
    hp = {
        "steps": 2,
        "batch_size": 2,
        "lr": 1e-2,
        "max_pairs": 16,
        "train_encoder": False,
        "logging_steps": 1,
    }
    train_stage("align", **base, data=alignment_cache, out=out, compression=4, hp=hp)
    model = RefragModel.from_pretrained(out)
    encoder = AutoModel.from_pretrained(base["encoder"]).state_dict()
    assert all(torch.equal(encoder[k], v) for k, v in model.encoder.state_dict().items())
    log = json.loads((out / "training_log.json").read_text())["log_history"]
    assert any("align_mse" in e and "align_kld" in e and "align_argmax" in e for e in log)


def test_frozen_decoder_is_unchanged_by_training(base, shards, tmp_path):
    out = tmp_path / "cpt_frozen"
    train_stage(
        "cpt_frozen",
        **base,
        data=shards,
        out=out,
        compression=4,
        hp={"steps": 2, "batch_size": 2, "lr": 1e-2},
    )
    before = AutoModelForCausalLM.from_pretrained(base["decoder"]).state_dict()
    after = RefragModel.from_pretrained(out).decoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_interrupted_stage_resumes_from_its_last_complete_checkpoint(
    base, shards, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "cpt"
    hp = {"steps": 4, "batch_size": 2, "save_steps": 2, "logging_steps": 1}
    restore = interrupt_at_step(monkeypatch, RefragTrainer, 3)
    with pytest.raises(KeyboardInterrupt):
        train_stage("cpt", **base, data=shards, out=out, compression=4, hp=hp)
    work = tmp_path / "cpt.work"
    assert not out.exists() and last_complete_checkpoint(work).endswith("checkpoint-2")
    (work / "checkpoint-3").mkdir()  # a save that was killed: no trainer_state.json
    (work / "checkpoint-3" / "model.safetensors").write_bytes(b"partial")

    restore()
    train_stage("cpt", **base, data=shards, out=out, compression=4, hp=hp)
    assert "resuming cpt from" in capsys.readouterr().out
    steps = [
        e["step"]
        for e in json.loads((out / "training_log.json").read_text())["log_history"]
        if "loss" in e
    ]
    assert steps == [1, 2, 3, 4]
    RefragModel.from_pretrained(out)


def test_alignment_collator_caps_the_pairs_per_batch(alignment_cache, refrag_tokenizer):
    rows = pd.read_parquet(alignment_cache).to_dict("records")[:3]
    batch = AlignmentCollator(refrag_tokenizer, max_pairs=10)(rows)
    assert len(batch["chunk_input_ids"]) == len(batch["pair_decoder_ids"]) == 10


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["align", "cpt", "sft", "mixed", "policy"])  # every trainer
def test_a_stage_trains_under_torchrun_with_two_processes(
    stage, base, shards, alignment_cache, tiny_checkpoint, tmp_path
):
    """The GPU rules' launch path, on CPU: torchrun, gloo, one log per rank, one output; a
    stage with a previous one starts from a tiny REFRAG checkpoint."""
    out, ranks = tmp_path / stage, tmp_path / "ranks"
    data = alignment_cache if STAGES[stage].data == "alignment" else shards
    if stage == "sft":  # SFT reads a question file here (the tiny windows are too short)
        data = tmp_path / "qa.jsonl"
        row = {"question": "Who designed it?", "answer": "Charles Babbage", "context": TEXT[:300]}
        data.write_text(json.dumps(row) + "\n")
    start = ["--init", str(tiny_checkpoint)] if STAGES[stage].previous else []
    start = start or ["--encoder", str(base["encoder"]), "--decoder", str(base["decoder"])]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "refrag.cli",
        "train",
        "--stage",
        stage,
        "--k",
        "4",
        *start,
        "--data",
        str(data),
        "--out",
        str(out),
        "--hp",
        json.dumps({"steps": 2, "batch_size": 2, "max_pairs": 8}),
        "--rank-log-dir",
        str(ranks),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert sorted(p.name for p in ranks.iterdir()) == ["run-0.log", "run-1.log"]
    assert RefragModel.from_pretrained(out).config.compression == 4
    log = json.loads((out / "training_log.json").read_text())
    assert log["metrics"]["train_samples_per_second"] > 0 and log["log_history"][-1]["step"] == 2


def test_a_stage_starts_from_either_a_checkpoint_or_both_base_models(base, shards, tmp_path):
    kwargs = {"data": shards, "out": tmp_path / "x", "compression": 4}
    with pytest.raises(ValueError, match="either init"):
        train_stage("cpt", init=tmp_path, **base, **kwargs)
    with pytest.raises(ValueError, match="either init"):
        train_stage("cpt", encoder=base["encoder"], **kwargs)
    with pytest.raises(ValueError, match="unknown stage 'dpo'"):
        train_stage("dpo", **base, **kwargs)


def test_unset_hyperparameters_come_from_the_stage_registry(base, shards, tmp_path):
    out = tmp_path / "cpt"
    train_stage("cpt", **base, data=shards, out=out, compression=4, hp={"steps": 1})
    hp = json.loads((out / "training_log.json").read_text())["hp"]
    defaults = STAGES["cpt"].defaults
    assert hp["steps"] == 1 and (hp["batch_size"], hp["lr"]) == (defaults.batch_size, defaults.lr)


def test_cli_wants_the_encoder_with_the_decoder():
    with pytest.raises(SystemExit) as stop:
        main(["train", "--stage", "cpt", "--k", "4", "--encoder", "e", "--data", "d", "--out", "o"])
    assert "--encoder and --decoder go together" in str(stop.value)


def test_a_damaged_init_stops_the_cli_in_one_line_naming_the_rule_that_rebuilds_it(
    tiny_checkpoint, shards, tmp_path
):
    init = shutil.copytree(tiny_checkpoint, tmp_path / "reconstruct")
    weights = init / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # truncated
    args = ["train", "--stage", "cpt", "--k", "4", "--init", str(init), "--data", str(shards)]
    args += ["--out", str(tmp_path / "cpt"), "--rebuilt-by", json.dumps({str(init): "train"})]
    with pytest.raises(SystemExit) as stop:
        main(args)
    (line,) = str(stop.value).splitlines()
    assert line.startswith("error: ") and str(weights) in line
    assert line.endswith("rerun rule train")


def test_the_log_records_the_strategy_the_trainer_ran_and_the_throughput(base, shards, tmp_path):
    out = tmp_path / "cpt"
    train_stage("cpt", **base, data=shards, out=out, compression=4, hp={"steps": 1})
    log = json.loads((out / "training_log.json").read_text())
    assert log["parallel"]["strategy"] == "single"  # one CPU process: read from accelerate
    assert log["parallel"]["distributed_type"] == "NO" and log["parallel"]["world_size"] == 1
    assert log["throughput"]["samples_per_second"] > 0
    assert log["throughput"]["tokens_per_second"] > log["throughput"]["samples_per_second"]
    assert log["throughput"]["mfu"] is None  # no GPU peak to divide by


@pytest.mark.slow
def test_a_compiled_stage_trains_as_the_eager_one(base, shards, tmp_path):
    """parallel.compile: the Trainer runs the torch.compile'd model (read from the trainer)
    and logs the eager run's losses."""
    hp = {"steps": 2, "batch_size": 2, "logging_steps": 1, "seed": 3}
    logs = {}
    for compiled in (False, True):
        out = tmp_path / f"cpt{compiled}"
        kwargs = {"data": shards, "out": out, "compression": 4, "hp": hp}
        train_stage("cpt", **base, **kwargs, parallel={"compile": compiled})
        logs[compiled] = json.loads((out / "training_log.json").read_text())
        assert logs[compiled]["parallel"]["compiled"] is compiled
    eager, compiled = ([e["loss"] for e in logs[c]["log_history"] if "loss" in e] for c in logs)
    assert eager == pytest.approx(compiled, rel=1e-3)


def test_fsdp_without_a_gpu_is_refused_in_one_line(base, shards, tmp_path):
    with pytest.raises(ParallelError, match="strategy fsdp needs GPUs"):
        train_stage(
            "cpt",
            **base,
            data=shards,
            out=tmp_path / "x",
            compression=4,
            hp={"steps": 1},
            parallel={"strategy": "fsdp"},
        )
