"""refrag.train.heldout: the held-out curve a training stage logs."""

import json

import pytest

from refrag.train.runner import train_stage

from .conftest import interrupt_at_step


def test_held_out_curve_logs_retained_share_against_tokens(tiny_model_dirs, shards, tmp_path):
    base = {"encoder": tiny_model_dirs["encoder"], "decoder": tiny_model_dirs["decoder"]}
    out = tmp_path / "cpt"
    hp = {"steps": 4, "batch_size": 2, "eval_steps": 2}
    train_stage("cpt", **base, data=shards, heldout=shards, out=out, compression=4, hp=hp)
    log = json.loads((out / "training_log.json").read_text())["log_history"]
    points = [e for e in log if "heldout_log_ppl" in e]
    assert [p["step"] for p in points] == [0, 2, 4]
    assert [p["heldout_windows_seen"] for p in points] == [0, 4, 8]
    (base_point,) = [e for e in log if "heldout_no_context" in e]
    for p in points:
        no, full = base_point["heldout_no_context"], base_point["heldout_full_context"]
        assert p["heldout_retained"] == pytest.approx((no - p["heldout_log_ppl"]) / (no - full))


def test_a_resumed_stage_keeps_its_baselines_and_adds_no_second_start_point(
    tiny_model_dirs, shards, tmp_path, monkeypatch
):
    from refrag.train.trainers import RefragTrainer

    base = {"encoder": tiny_model_dirs["encoder"], "decoder": tiny_model_dirs["decoder"]}
    out = tmp_path / "cpt"
    hp = {"steps": 4, "batch_size": 2, "eval_steps": 2, "save_steps": 2}
    restore = interrupt_at_step(monkeypatch, RefragTrainer, 3)
    with pytest.raises(KeyboardInterrupt):
        train_stage("cpt", **base, data=shards, heldout=shards, out=out, compression=4, hp=hp)
    restore()
    train_stage("cpt", **base, data=shards, heldout=shards, out=out, compression=4, hp=hp)
    log = json.loads((out / "training_log.json").read_text())["log_history"]
    assert [e["step"] for e in log if "heldout_log_ppl" in e] == [0, 2, 4]
    assert len([e for e in log if "heldout_no_context" in e]) == 1


def test_given_baselines_are_used_and_logged(tiny_model_dirs, shards, tmp_path):
    base = {"encoder": tiny_model_dirs["encoder"], "decoder": tiny_model_dirs["decoder"]}
    out = tmp_path / "cpt"
    baselines = {"no_context": 10.0, "full_context": 0.0, "full_context_encoder_text": 1.0}
    hp = {"steps": 2, "batch_size": 2, "eval_steps": 2}
    train_stage(
        "cpt",
        **base,
        data=shards,
        heldout=shards,
        heldout_baselines=baselines,
        out=out,
        compression=4,
        hp=hp,
    )
    log = json.loads((out / "training_log.json").read_text())["log_history"]
    (start,) = [e for e in log if "heldout_no_context" in e]
    assert (start["heldout_no_context"], start["heldout_full_context"]) == (10.0, 0.0)
    for point in (e for e in log if "heldout_log_ppl" in e):
        assert point["heldout_retained"] == pytest.approx(1 - point["heldout_log_ppl"] / 10)
