"""The memory check: estimates against measured peaks of tiny models (CPU, fp32, within 25%),
the 7B plan's numbers, and the preflight's one-line refusals."""

from __future__ import annotations

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from refrag.modeling import RefragModel
from refrag.preflight import memory_errors, run_memory_errors
from refrag.train.launch import Parallel
from refrag.train.memory import (
    GIB,
    KNOWN_CONFIGS,
    Shapes,
    Workload,
    check_memory,
    estimate_peak,
    projector_params,
    stage_workload,
)
from refrag.train.stages import STAGES, StageConfig
from tests.conftest import tiny_config


def measured_and_estimated(batch_size, chunks, text, checkpointing, small_vocab) -> tuple[int, int]:
    """Peak bytes of live tensors in one steady-state cpt step (after a first step made the
    optimizer's state), measured by torch's MemTracker, and the estimate of the same step."""
    torch.manual_seed(0)
    config = tiny_config()
    if small_vocab:  # activations, not the vocabulary, dominate
        for sub, hidden, mlp in ((config.encoder, 128, 512), (config.decoder, 128, 384)):
            sub.vocab_size, sub.hidden_size, sub.intermediate_size = 256, hidden, mlp
        config.projector_hidden_size = 128
    model = RefragModel(config).train()
    model.set_trainable(encoder=True, projector=True, decoder=True)
    if checkpointing:
        model.gradient_checkpointing_enable()
    k, n = config.compression, 1 + chunks + text
    ids = torch.randint(3, 256, (batch_size, n))
    chunk_mask = torch.zeros(batch_size, n, dtype=torch.bool)
    chunk_mask[:, 1 : 1 + chunks] = True
    labels = ids.masked_fill(chunk_mask, -100)
    labels[:, 0] = -100
    chunk_ids = torch.randint(3, 256, (batch_size * chunks, k + 2))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "chunk_mask": chunk_mask,
        "labels": labels,
        "chunk_input_ids": chunk_ids,
        "chunk_attention_mask": torch.ones_like(chunk_ids),
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # the Trainer's

    def train_step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    train_step()
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        train_step()
    measured = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    hp = StageConfig(batch_size=batch_size, train_decoder=True)
    estimate = estimate_peak(
        "cpt",
        hp,
        Workload(n, text, chunks, k + 2),
        encoder=Shapes.of_model(model.encoder),
        decoder=Shapes.of_model(model.decoder),
        projector=sum(p.numel() for p in model.projector.parameters()),
        parallel=Parallel(activation_checkpointing=checkpointing),
        bf16=False,
    )
    return measured, estimate.tensors


@pytest.mark.parametrize(
    "batch_size, chunks, text, checkpointing, small_vocab",
    [
        (2, 2, 6, False, False),  # the model state and its vocabulary gradients
        (8, 16, 32, False, False),  # the logits
        (32, 16, 64, False, True),  # activations of both sub-models
        (32, 16, 64, True, True),  # activation checkpointing
    ],
)
def test_estimate_is_within_a_quarter_of_the_measured_peak(
    batch_size, chunks, text, checkpointing, small_vocab
):
    measured, estimated = measured_and_estimated(
        batch_size, chunks, text, checkpointing, small_vocab
    )
    assert 0.75 <= estimated / measured <= 1.25, (estimated, measured)


@pytest.fixture(scope="module")
def paper_shapes() -> dict[str, Shapes]:
    return {
        "decoder": Shapes.of(KNOWN_CONFIGS["meta-llama/Llama-2-7b-hf"], causal=True),
        "encoder": Shapes.of(KNOWN_CONFIGS["roberta-large"], causal=False),
    }


def cpt_estimate(shapes, parallel, batch_size=1):
    hp = STAGES["cpt"].defaults.merged({"batch_size": batch_size, "target_tokens": 0})
    work = stage_workload("cpt", hp, 16, 2048, 2048)
    return estimate_peak(
        "cpt",
        hp,
        work,
        encoder=shapes["encoder"],
        decoder=shapes["decoder"],
        projector=projector_params(shapes["encoder"], shapes["decoder"]),
        parallel=parallel,
    )


def test_the_paper_pair_counts_7_11b_parameters(paper_shapes):
    total = (
        paper_shapes["decoder"].params
        + paper_shapes["encoder"].params
        + projector_params(paper_shapes["encoder"], paper_shapes["decoder"])
    )
    assert total == pytest.approx(7.11e9, rel=0.01)


def test_ddp_holds_the_whole_state_and_fsdp_divides_it(paper_shapes):
    ddp = cpt_estimate(paper_shapes, Parallel(gpus_per_node=8))
    fsdp = cpt_estimate(paper_shapes, Parallel(gpus_per_node=8, strategy="fsdp"))
    assert ddp.model_state / GIB == pytest.approx(7.11e9 * 16 / GIB, rel=0.05)  # 12 B + buckets
    assert ddp.gib() > 120 and fsdp.gib() < 40
    checkpointed = cpt_estimate(
        paper_shapes, Parallel(gpus_per_node=8, strategy="fsdp", activation_checkpointing=True)
    )
    assert checkpointed.activations < fsdp.activations / 5


def test_a_plan_that_cannot_fit_is_refused_in_one_line_with_the_fix(paper_shapes):
    parallel = Parallel(gpus_per_node=8)

    def estimate_for(p):
        return cpt_estimate(paper_shapes, p)

    line = check_memory(estimate_for, parallel, "k16/cpt")
    assert line.startswith("k16/cpt needs ~")
    assert "GiB per GPU with ddp on 80 GiB cards; set strategy: fsdp" in line
    assert "\n" not in line
    assert check_memory(estimate_for, Parallel(gpus_per_node=8, strategy="fsdp"), "x") is None


def test_preflight_refuses_the_readme_7b_plan_and_passes_fsdp(tmp_path):
    config = {
        "models": {"llama": "hf:meta-llama/Llama-2-7b-hf", "roberta": "hf:roberta-large"},
        "data": {"context_tokens": 2048, "target_tokens": 2048},
        "train": {"cpt": {"batch_size": 1}},
        "eval": {"stages": ["cpt"]},
    }
    run = {"decoder": "llama", "encoder": "roberta", "k": [16]}
    errors = run_memory_errors(config, run, Parallel(gpus_per_node=8), tmp_path, "runs[0] ")
    assert any("k16/cpt needs" in e and "set strategy: fsdp" in e for e in errors), errors
    fsdp = Parallel(gpus_per_node=8, strategy="fsdp")
    assert run_memory_errors(config, run, fsdp, tmp_path) == []


def test_fsdp_without_gpus_is_refused_before_any_job(tmp_path):
    config = {
        "models": {"d": "embedded:x", "e": "embedded:y"},
        "parallel": {"strategy": "fsdp"},
        "runs": [{"decoder": "d", "encoder": "e", "k": [16]}],
    }
    (error,) = memory_errors(config, tmp_path)
    assert error.startswith("config runs[0]: strategy fsdp needs GPUs")
    config["runs"][0]["gpus"] = 0  # the default config's CPU runs: nothing to estimate
    config["parallel"] = {}
    assert memory_errors(config, tmp_path) == []
