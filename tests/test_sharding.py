"""FSDP2 through the project's own sharding function (raw ``fully_shard``, gloo, 2 CPU
processes) on the tiny REFRAG model: the same losses as one process, a sharded save that
resumes to the same next loss, and a plain HF folder at the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from refrag.io.integrity import IntegrityError
from refrag.modeling import RefragModel
from refrag.train.launch import Parallel
from refrag.train.resume import check_checkpoint_files
from refrag.train.sharding import (
    full_state_dict,
    layer_classes,
    load_sharded,
    save_sharded,
    shard_model,
    shard_units,
    trainer_fsdp_args,
)
from tests.conftest import tiny_config

GLOBAL_BATCH, CHUNKS, TEXT, STEPS = 4, 2, 6, 3


def batch(rows: slice) -> dict[str, torch.Tensor]:
    """A fixed global batch (each row: CHUNKS chunk positions, TEXT labelled tokens); ``rows``
    picks a rank's part."""
    g = torch.Generator().manual_seed(1)
    k = tiny_config().compression
    n = CHUNKS + TEXT
    input_ids = torch.randint(3, 1000, (GLOBAL_BATCH, n), generator=g)
    chunk_mask = torch.zeros(GLOBAL_BATCH, n, dtype=torch.bool)
    chunk_mask[:, :CHUNKS] = True
    chunk_ids = torch.randint(3, 1000, (GLOBAL_BATCH, CHUNKS, k + 2), generator=g)
    part = {
        "input_ids": input_ids,
        "attention_mask": torch.ones(GLOBAL_BATCH, n, dtype=torch.long),
        "chunk_mask": chunk_mask,
        "labels": input_ids.masked_fill(chunk_mask, -100),
    }
    part = {name: value[rows] for name, value in part.items()}
    part["chunk_input_ids"] = chunk_ids[rows].reshape(-1, k + 2)
    part["chunk_attention_mask"] = torch.ones_like(part["chunk_input_ids"])
    return part


def fresh_model(seed: int = 0) -> RefragModel:
    torch.manual_seed(seed)
    model = RefragModel(tiny_config()).eval()  # eval: no dropout, so ranks can match one process
    model.set_trainable(encoder=True, projector=True, decoder=True)
    return model


def step(model, optimizer, rows: slice) -> float:
    loss = model(**batch(rows)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    value = loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return value.item()


def one_process_losses() -> list[float]:
    model = fresh_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return [step(model, optimizer, slice(None)) for _ in range(STEPS)]


def worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world
    )
    torch.set_num_threads(1)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    model = shard_model(fresh_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for i in range(STEPS):
        if i == STEPS - 1:
            save_sharded(Path(tmp, "ckpt"), model, optimizer)
        losses.append(step(model, optimizer, rows))
    resumed = shard_model(fresh_model(seed=1))  # other weights: the load must replace them
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    load_sharded(Path(tmp, "ckpt"), resumed, resumed_optimizer)
    resumed_loss = step(resumed, resumed_optimizer, rows)
    state = full_state_dict(resumed)  # every rank: a collective
    if rank == 0:
        plain = fresh_model(seed=2)
        plain.load_state_dict(state)
        plain.save_pretrained(Path(tmp, "hf"))
        out = {"losses": losses, "resumed_loss": resumed_loss}
        Path(tmp, "result.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_units_are_both_submodels_layers():
    model = fresh_model()
    assert layer_classes(model) == ["BertEmbeddings", "BertLayer", "LlamaDecoderLayer"]
    units = shard_units(model)
    assert len(units) == 1 + 2 + 2  # embeddings, 2 encoder layers, 2 decoder layers
    assert model.encoder.embeddings in units and model.decoder.model.layers[0] in units


def test_trainer_keys_name_fsdp2_sharded_checkpoints_and_the_units():
    model = fresh_model()
    args = trainer_fsdp_args(Parallel(strategy="fsdp", activation_checkpointing=True), model)
    assert args["fsdp"] is True
    config = args["fsdp_config"]
    assert config["version"] == 2 and config["state_dict_type"] == "SHARDED_STATE_DICT"
    assert config["transformer_layer_cls_to_wrap"] == layer_classes(model)
    assert config["activation_checkpointing"] is True
    assert trainer_fsdp_args(Parallel(), model) == {}  # the default: the Trainer as before
    assert trainer_fsdp_args(Parallel(activation_checkpointing=True), model) == {
        "gradient_checkpointing": True
    }


def test_two_process_fsdp_matches_one_process_and_resumes_from_its_sharded_checkpoint(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "result.json").read_text())
    expected = one_process_losses()
    assert result["losses"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert result["losses"][-1] < result["losses"][0]  # it trained
    # resumed from the checkpoint saved before the last step: that step's loss again
    assert result["resumed_loss"] == pytest.approx(result["losses"][-1], rel=1e-5, abs=1e-6)
    # the gathered weights are a plain HF folder that from_pretrained reads
    loaded = RefragModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.isfinite(loaded(**batch(slice(None))).loss)


def test_resume_accepts_a_sharded_checkpoint_and_refuses_a_cut_shard(tmp_path):
    """The Trainer's FSDP checkpoint (pytorch_model_fsdp_0/ + optimizer_0/, distributed
    checkpoints) counts as complete; a shard cut short does not."""
    mp.spawn(worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    shutil.copytree(tmp_path / "ckpt", ckpt / "pytorch_model_fsdp_0")
    shutil.copytree(tmp_path / "ckpt", ckpt / "optimizer_0")
    check_checkpoint_files(ckpt)
    shard = sorted((ckpt / "pytorch_model_fsdp_0").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(IntegrityError, match="cut short"):
        check_checkpoint_files(ckpt)
