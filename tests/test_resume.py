"""Fault injection on Trainer checkpoints: a half-written or damaged one is skipped, never fatal."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil

import pytest
import torch
from transformers import Trainer

from refrag.cli import main
from refrag.io.integrity import MANIFEST, IntegrityError, write_manifest
from refrag.train.resume import check_checkpoint_files, last_complete_checkpoint, resumed_train_loss
from refrag.train.runner import train_stage

HP = {"steps": 4, "batch_size": 2, "save_steps": 2, "logging_steps": 1}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dirs, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "cpt"
    metrics = train_stage("cpt", **tiny_model_dirs, data=shards, out=out, compression=4, hp=HP)
    return metrics, json.loads((out / "training_log.json").read_text())


def fake_checkpoint(work, step: int, *, sealed: bool) -> None:
    """A plausible Trainer checkpoint: state, weights, optimizer."""
    from safetensors.torch import save_file

    path = work / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file({"w": torch.ones(64)}, str(path / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, path / "optimizer.pt")
    if sealed:
        write_manifest(path)


def test_a_checkpoint_without_its_seal_is_skipped_for_the_previous_one(tmp_path):
    fake_checkpoint(tmp_path, 2, sealed=True)
    fake_checkpoint(tmp_path, 4, sealed=False)  # killed before the seal was written
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-4").exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: (p / "trainer_state.json").write_text(""),  # what a power cut leaves
        lambda p: (p / "model.safetensors").write_bytes(
            (p / "model.safetensors").read_bytes()[:100]
        ),
        lambda p: (p / MANIFEST).write_text(""),
    ],
    ids=["empty-trainer-state", "truncated-safetensors", "empty-seal"],
)
def test_a_sealed_checkpoint_damaged_since_is_skipped(tmp_path, damage, capsys):
    fake_checkpoint(tmp_path, 2, sealed=True)
    fake_checkpoint(tmp_path, 4, sealed=True)
    damage(tmp_path / "checkpoint-4")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert "skipping checkpoint checkpoint-4" in capsys.readouterr().out


def test_nothing_to_resume_from_when_every_checkpoint_is_damaged(tmp_path):
    fake_checkpoint(tmp_path, 2, sealed=False)
    assert last_complete_checkpoint(tmp_path) is None
    assert last_complete_checkpoint(tmp_path / "absent") is None


@pytest.mark.parametrize(
    "damage, name",
    [
        (lambda p: (p / "trainer_state.json").write_text(""), "trainer_state.json"),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}"), "model"),
        (lambda p: (p / "model.safetensors").unlink(), "safetensors"),
    ],
)
def test_the_seal_is_refused_to_incomplete_files(tmp_path, damage, name):
    fake_checkpoint(tmp_path, 2, sealed=False)
    damage(tmp_path / "checkpoint-2")
    with pytest.raises(IntegrityError, match=name):
        check_checkpoint_files(tmp_path / "checkpoint-2")


def test_a_kill_during_a_save_resumes_from_the_previous_checkpoint_with_the_whole_log(
    tiny_model_dirs, shards, tmp_path, monkeypatch, capsys, uninterrupted
):
    out = tmp_path / "cpt"
    real_save = Trainer._save_optimizer_and_scheduler

    def killed_at_step_4(self, output_dir):
        if self.state.global_step == 4:  # weights written, optimizer and state not yet
            raise KeyboardInterrupt("killed mid-save")
        return real_save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_stage("cpt", **tiny_model_dirs, data=shards, out=out, compression=4, hp=HP)
    work = tmp_path / "cpt.work"
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (work / "checkpoint-4" / "model.safetensors").is_file()

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", real_save)
    metrics = train_stage("cpt", **tiny_model_dirs, data=shards, out=out, compression=4, hp=HP)
    printed = capsys.readouterr().out
    assert "skipping checkpoint checkpoint-4" in printed and "checkpoint-2" in printed
    log = json.loads((out / "training_log.json").read_text())
    want_metrics, want_log = uninterrupted
    losses = [(e["step"], e["loss"]) for e in log["log_history"] if "loss" in e]
    assert losses == [(e["step"], e["loss"]) for e in want_log["log_history"] if "loss" in e]
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert metrics["train_loss"] == pytest.approx(want_metrics["train_loss"], rel=1e-6)
    assert log["metrics"]["train_loss"] == pytest.approx(want_metrics["train_loss"], rel=1e-6)


def test_resumed_loss_weights_each_logged_loss_by_its_steps():
    history = [{"step": 2, "loss": 4.0}, {"step": 3, "loss": 1.0}, {"step": 6, "loss": 9.0}]
    # steps 1-2 mean 4, step 3 mean 1; resumed after step 3, steps 4-6 mean 2
    assert resumed_train_loss(history, 2.0, 3, 6) == pytest.approx((8 + 1 + 6) / 6)


def test_checkpoints_of_a_finished_stage_are_removed(tiny_model_dirs, shards, tmp_path):
    out = tmp_path / "cpt"
    train_stage("cpt", **tiny_model_dirs, data=shards, out=out, compression=4, hp=HP | {"steps": 2})
    assert not (tmp_path / "cpt.work").exists() and (out / MANIFEST).is_file()
    shutil.rmtree(out)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_in_a_sealed_checkpoint_is_skipped_for_the_previous_one(tmp_path, capsys):
    import numpy as np

    work, marker = tmp_path / "work", tmp_path / "ran"
    for step in (2, 4):
        fake_checkpoint(work, step, sealed=False)
        rng = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
        }  # what the Trainer saves, numpy state included: loads as weights only
        torch.save(rng, work / f"checkpoint-{step}" / "rng_state.pth")
        write_manifest(work / f"checkpoint-{step}")
    torch.save({"python": Payload(marker)}, work / "checkpoint-4" / "rng_state.pth")
    write_manifest(work / "checkpoint-4")  # resealed: the seal alone would pass it
    assert last_complete_checkpoint(work) == str(work / "checkpoint-2")
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("skipping checkpoint checkpoint-4: rng_state.pth holds a pickle payload")
    assert not marker.exists()


def test_a_full_disk_during_a_checkpoint_save_ends_in_one_line(
    tiny_model_dirs, shards, tmp_path, monkeypatch, capsys
):
    def disk_full(self, output_dir):
        raise OSError(errno.ENOSPC, "No space left on device", f"{output_dir}/optimizer.pt")

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", disk_full)
    out = tmp_path / "cpt"
    argv = ["train", "--stage", "cpt", "--k", "4", "--data", str(shards), "--out", str(out)]
    argv += ["--encoder", str(tiny_model_dirs["encoder"])]
    argv += ["--decoder", str(tiny_model_dirs["decoder"]), "--hp", json.dumps(HP)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    message = str(exc.value.code)
    assert "\n" not in message
    assert message.startswith(f"error: {out}.work/checkpoint-2/optimizer.pt: no space left")
    assert "MiB free there" in message and "resumes from its last complete checkpoint" in message
