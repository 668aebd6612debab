"""The GPU scripts' synthetic inputs (benchmarks/gpu_check.py, benchmarks/profile_step.py):
the main job's model shapes, and ragged batches the model reads as it reads real ones."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
import yaml

from refrag.io.models import resolve_model, split_layers_spec
from refrag.modeling import RefragModel

ROOT = Path(__file__).resolve().parents[1]
SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
)


def script(name: str) -> dict:
    """A benchmark script's namespace (its ``main`` not run)."""
    return runpy.run_path(str(ROOT / f"benchmarks/{name}.py"), run_name=name)


@pytest.fixture(scope="module")
def profile_step() -> dict:
    return script("profile_step")


def test_the_gpu_scripts_use_the_main_jobs_pair(profile_step):
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    run = config["runs"][0]
    layers, base = split_layers_spec(config["models"][run["encoder"]])
    assert base == config["models"][run["decoder"]]
    real = json.loads((resolve_model(base) / "config.json").read_text())
    pair = profile_step["pair"](False)  # gpu_check.pair("default")
    for sub, depth in ((pair.decoder, real["num_hidden_layers"]), (pair.encoder, layers)):
        assert {key: getattr(sub, key) for key in SHAPE_KEYS} == {
            key: real[key] for key in SHAPE_KEYS
        }
        assert sub.num_hidden_layers == depth
    assert pair.chunk_pooling == "mean"  # a causal encoder's rows, as RefragModel pools them
    assert (
        script("gpu_check")["row_width"](pair) == 16
    )  # the SmolLM2 tokenizer adds nothing to a chunk row


def test_ragged_batches_change_shape_and_label_only_the_targets(profile_step):
    config = profile_step["pair"](True)
    data = profile_step["RaggedWindows"](16, config)
    batches = [
        profile_step["ragged_collate"]([data[j] for j in range(i, i + 4)]) for i in (0, 4, 8, 12)
    ]
    shapes = {(b["input_ids"].shape[1], b["chunk_input_ids"].shape[0]) for b in batches}
    assert len(shapes) > 1
    for batch in batches:
        assert int(batch["chunk_mask"].sum()) == batch["chunk_input_ids"].shape[0]
        real = batch["attention_mask"].bool()
        assert not (batch["chunk_mask"] & ~real).any()
        labelled = batch["labels"] != -100
        assert not (labelled & (batch["chunk_mask"] | ~real)).any()
        assert not labelled[:, 0].any()  # BOS
        assert (labelled.sum(1) >= 32).all()  # at least half the 64 targets
    torch.manual_seed(0)
    loss = RefragModel(config)(**batches[0]).loss
    assert torch.isfinite(loss)
