"""The peak memory of a training stage per GPU, estimated before any job runs.

:func:`estimate_peak` adds, in bytes per process:

- model state by strategy (AdamW, fp32 masters; bf16 only in compute): 4 bytes per parameter,
  plus 4 (gradient) + 8 (Adam moments) per trainable one; DDP adds a gradient bucket per
  trainable parameter (4 bytes) when there is more than one process; FSDP (full shard) divides
  the state by the processes and adds the gathered units: two layers in flight, one layer's
  unsharded gradients and the root (embeddings, head) unsharded for the whole step;
- activations by positions × micro-batch: per position and layer of a sub-model that
  backward goes through, ``ACTIVATION_ELEMENTS`` elements of the compute dtype (LLaMA-like:
  12h + 4f; BERT-like: 7h + 4f, h hidden size, f MLP width); with activation checkpointing,
  each layer keeps only its input (h) and one layer's activations are rebuilt at a time;
- the backward's gradients (4 bytes per trainable parameter, sharded under FSDP) and the
  dense vocabulary-matrix gradients of a trained decoder before they are summed, which
  replace the activations as backward frees them (the peak is the larger of the two);
- the loss: ``a + 8`` bytes per vocabulary entry and labelled position (the logits in the
  compute dtype a, their fp32 log-softmax and its gradient).

:func:`check_memory` turns an estimate over the card's memory into the one-line refusal the
preflight prints ("k16/cpt needs ~131 GiB per GPU with ddp on 80 GiB cards; set strategy:
fsdp"). ``GPU_OVERHEAD_GIB`` stands for the CUDA context and the allocator's slack, which
``torch.cuda.max_memory_allocated`` does not count. The estimate was checked against measured
peaks of the tiny model on CPU (fp32; tests/test_memory.py, within 25%) and is checked on GPUs
by benchmarks/gpu_check.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig

from refrag.train.launch import Parallel
from refrag.train.stages import StageConfig

GIB = 2**30
GPU_OVERHEAD_GIB = 3.0
# The published config.json of hub models the paper uses (config/shapes/<repo>/config.json,
# shipped with the repository; REFRAG_SHAPES_DIR points elsewhere), for plans whose models
# are not fetched yet: the shapes, never the weights.
SHAPES_DIR = Path(
    os.environ.get("REFRAG_SHAPES_DIR", Path(__file__).parents[2] / "config" / "shapes")
)
ALIASES = {"roberta-large": "FacebookAI/roberta-large"}


def shipped_configs(folder: Path = SHAPES_DIR) -> dict[str, dict[str, Any]]:
    """``repo → config.json`` of every ``[owner/]repo/config.json`` under ``folder``."""
    paths = sorted(folder.glob("*/*/config.json")) + sorted(folder.glob("*/config.json"))
    found = {str(p.parent.relative_to(folder)): json.loads(p.read_text()) for p in paths}
    return found | {alias: found[repo] for alias, repo in ALIASES.items() if repo in found}


KNOWN_CONFIGS: dict[str, dict[str, Any]] = shipped_configs()
ACTIVATION_ELEMENTS = {"decoder": (12, 4), "encoder": (7, 4)}  # (× hidden, × MLP width)


@dataclass(frozen=True)
class Shapes:
    """What the estimate needs of one sub-model."""

    params: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    largest_unit: int  # parameters of the largest layer (a sharding unit)
    root: int  # parameters outside the layers (embeddings, head, final norm)

    @classmethod
    def of(cls, config: PretrainedConfig | dict, causal: bool) -> Shapes:
        """Counted on a meta-device instance of ``config`` (nothing is allocated)."""
        if isinstance(config, dict):
            settings = dict(config)
            config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        with torch.device("meta"):
            model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
        return cls.of_model(model)

    @classmethod
    def of_model(cls, model: nn.Module) -> Shapes:
        config = model.config
        units = set(getattr(model, "_no_split_modules", None) or [])
        sizes = [_count(m) for m in model.modules() if type(m).__name__ in units]
        params = _count(model)
        return cls(
            params=params,
            hidden=config.hidden_size,
            intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
            layers=config.num_hidden_layers,
            vocab=config.vocab_size,
            largest_unit=max(sizes, default=0),
            root=params - sum(sizes),
        )


def projector_params(encoder: Shapes, decoder: Shapes) -> int:
    """The 2-layer MLP projector at its default width (the decoder's hidden size)."""
    return (encoder.hidden + 1) * decoder.hidden + (decoder.hidden + 1) * decoder.hidden


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@dataclass(frozen=True)
class Workload:
    """One sample of a stage, in positions."""

    decoder_positions: int  # 0: no decoder pass (the align stage)
    labelled: int  # positions whose logits the loss reads
    encoder_rows: int
    encoder_width: int


def stage_workload(stage: str, hp: StageConfig, k: int, context: int, target: int) -> Workload:
    """Positions of one sample of ``stage`` at compression ``k`` with windows of ``context``
    + ``target`` decoder tokens (the longest sample: a curriculum's last length, a mixed
    input's largest expanded fraction)."""
    chunks, labelled = -(-context // k), (hp.target_tokens or target)
    if stage == "align":  # no decoder pass: max_pairs chunk rows per *batch* (see estimate)
        return Workload(0, 0, 0, k + 2)
    if stage == "reconstruct":
        chunks = min(max(hp.curriculum), chunks)
        labelled = chunks * k
    expanded = int(chunks * hp.max_expand_fraction) if stage == "mixed" else 0
    positions = 1 + (chunks - expanded) + expanded * k + labelled
    return Workload(positions, labelled, chunks, k + 2)


@dataclass
class Estimate:
    stage: str
    strategy: str
    world_size: int
    model_state: int  # bytes per process: weights, optimizer, buckets or gathered units
    gradients: int
    activations: int
    loss: int

    @property
    def tensors(self) -> int:
        """Bytes of live tensors at the peak (what max_memory_allocated measures): the model
        state, then the larger of the forward's end (activations and loss, the gradients
        freed by the previous step) and the backward's (the gradients)."""
        return self.model_state + max(self.gradients, self.activations + self.loss)

    def gib(self, overhead_gib: float = GPU_OVERHEAD_GIB) -> float:
        """The peak per GPU in GiB, the CUDA context and allocator slack included."""
        return self.tensors / GIB + overhead_gib

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"tensors": self.tensors, "gib": round(self.gib(), 2)}


def estimate_peak(
    stage: str,
    hp: StageConfig,
    work: Workload,
    *,
    encoder: Shapes,
    decoder: Shapes,
    projector: int,
    parallel: Parallel,
    bf16: bool | None = None,
) -> Estimate:
    """Peak bytes per process of one training step of ``stage`` (see the module doc)."""
    bf16 = parallel.mixed_precision == "bf16" and parallel.gpus > 0 if bf16 is None else bf16
    a = 2 if bf16 else 4
    frozen_model = stage == "policy"  # it trains only the (tiny) chunk policy
    trains = {
        "encoder": hp.train_encoder and not frozen_model,
        "projector": hp.train_projector and not frozen_model,
        "decoder": hp.train_decoder and not frozen_model and work.decoder_positions > 0,
    }
    sizes = {"encoder": encoder.params, "projector": projector, "decoder": decoder.params}
    total = sum(sizes.values())
    trainable = sum(sizes[part] for part, on in trains.items() if on)
    world = parallel.world_size
    fsdp = parallel.strategy == "fsdp" and not frozen_model
    state, gradients = 4 * total + 8 * trainable, 4 * trainable
    if trains["decoder"]:  # the dense embedding and head gradients, before they are summed
        gradients += 2 * 4 * decoder.vocab * decoder.hidden
    if fsdp:
        unit = max(encoder.largest_unit, decoder.largest_unit)
        gathered = (2 * unit + encoder.root + decoder.root + projector) * a
        state, gradients = state // world + gathered, gradients // world + unit * a
    elif world > 1:
        state += 4 * trainable  # DDP's gradient buckets
    rows = work.encoder_rows * hp.batch_size
    if stage == "align":
        rows = hp.max_pairs
    backward = {  # a sub-model keeps activations if backward runs through it
        "encoder": trains["encoder"],
        "decoder": trains["decoder"] or trains["encoder"] or trains["projector"],
    }
    kept, rebuilt = 0, 0  # saved for backward; one layer's, rebuilt under checkpointing
    for part, shapes, positions in (
        ("encoder", encoder, rows * work.encoder_width),
        ("decoder", decoder, work.decoder_positions * hp.batch_size),
    ):
        per_layer = positions * a * _layer_elements(part, shapes)
        if not backward[part]:
            rebuilt = max(rebuilt, per_layer)  # no graph kept: one layer's at a time
        elif parallel.activation_checkpointing:
            kept += positions * a * shapes.hidden * shapes.layers
            rebuilt = max(rebuilt, per_layer)
        else:
            kept += per_layer * shapes.layers
    activations = kept + rebuilt
    if stage == "align":  # pairs × vocabulary: logits, target logits, log-softmaxes, grads
        loss = hp.max_pairs * decoder.vocab * 4 * 5
    else:
        loss = (work.labelled + 1) * hp.batch_size * decoder.vocab * (a + 8)
    strategy = "fsdp" if fsdp else ("ddp" if world > 1 else "single")
    return Estimate(stage, strategy, world, int(state), int(gradients), int(activations), int(loss))


def _layer_elements(part: str, shapes: Shapes) -> int:
    per_hidden, per_mlp = ACTIVATION_ELEMENTS[part]
    return per_hidden * shapes.hidden + per_mlp * shapes.intermediate


def check_memory(
    estimate_for: Callable[[Parallel], Estimate], parallel: Parallel, label: str
) -> str | None:
    """``None`` when the estimate of ``parallel`` fits ``parallel.gpu_memory_gib``; else the
    one-line refusal, naming ``label`` (e.g. ``k16/cpt``), the estimate and the first fix
    that fits (``estimate_for`` estimates other settings)."""
    need, have = estimate_for(parallel).gib(), parallel.gpu_memory_gib
    if need <= have:
        return None
    fix = "add GPUs (nodes × gpus_per_node) or lower batch_size"
    for change, words in (
        ({"strategy": "fsdp"}, "set strategy: fsdp"),
        ({"activation_checkpointing": True}, "set activation_checkpointing: true"),
        (
            {"strategy": "fsdp", "activation_checkpointing": True},
            "set strategy: fsdp and activation_checkpointing: true",
        ),
    ):
        other = replace(parallel, **change)
        if other != parallel and estimate_for(other).gib() <= have:
            fix = words
            break
    return (
        f"{label} needs ~{need:.0f} GiB per GPU with {parallel.strategy} on {have:g} GiB "
        f"cards; {fix}"
    )
