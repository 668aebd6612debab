"""FSDP2 for a REFRAG model: which modules are the sharding units, the Trainer's FSDP keys,
and the raw ``fully_shard`` path with its distributed-checkpoint save and load.

The units are the layers of both sub-models: the classes of the model's merged
``_no_split_modules`` (``LlamaDecoderLayer``, ``BertLayer``, ``BertEmbeddings`` for the
default pair; ``RobertaLayer`` … for the paper's), each ``fully_shard``-ed, then the root
(projector, decoder embeddings and head, norms, the policy). Two ways in:

- on GPUs, the Trainer (accelerate) shards the model: :func:`trainer_fsdp_args` gives the
  ``TrainingArguments`` keys (FSDP2, full shard, the same unit classes, sharded checkpoints
  in torch's distributed-checkpoint format, activation checkpointing per unit);
- :func:`shard_model`, raw ``fully_shard`` with an optional bf16 ``MixedPrecisionPolicy``:
  what CI runs on CPU with gloo (there the Trainer would silently use DDP instead: accelerate
  enables FSDP only on accelerators), with :func:`save_sharded` / :func:`load_sharded`.

Either way a stage ends in a plain HF folder: :func:`full_state_dict` gathers the weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from refrag.train.launch import Parallel

# the Trainer's sharded checkpoint: pytorch_model_fsdp_0/ + optimizer_0/, each a
# distributed checkpoint (.metadata + __{rank}_0.distcp)
SHARDED_MODEL_DIR = "pytorch_model_fsdp_0"
SHARDED_OPTIMIZER_DIR = "optimizer_0"


def layer_classes(model: nn.Module) -> list[str]:
    """Class names of the sharding units: the model's ``_no_split_modules`` (both sub-models'
    layers, merged by transformers)."""
    names = sorted(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(model).__name__} names no layer classes to shard")
    return names


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`shard_model` wraps, innermost first (children before parents)."""
    names = set(layer_classes(model))
    return [m for m in reversed(list(model.modules())) if type(m).__name__ in names]


def shard_model(
    model: nn.Module,
    *,
    mesh: Any = None,
    bf16: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2 (``fully_shard``) on every layer of the encoder and the decoder, then the root;
    ``bf16``: gather parameters and compute in bf16, reduce gradients in fp32 (the masters
    stay fp32). Changes ``model`` in place and returns it."""
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    settings = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": reshard_after_forward}
    units = shard_units(model)
    if not units:
        raise ValueError(f"no module of {layer_classes(model)} in {type(model).__name__}")
    for unit in units:
        fully_shard(unit, **settings)
    fully_shard(model, **settings)
    return model


def trainer_fsdp_args(parallel: Parallel, model: nn.Module) -> dict[str, Any]:
    """``TrainingArguments`` keys of ``parallel`` (``{}`` unless its strategy is fsdp): FSDP2,
    full shard, the units of :func:`layer_classes`, sharded checkpoints, and activation
    checkpointing per unit (ddp: the Trainer's ``gradient_checkpointing``)."""
    if parallel.strategy != "fsdp":
        return {"gradient_checkpointing": True} if parallel.activation_checkpointing else {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": True,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": layer_classes(model),
            "state_dict_type": "SHARDED_STATE_DICT",
            "activation_checkpointing": parallel.activation_checkpointing,
            "cpu_ram_efficient_loading": False,
        },
    }


def is_sharded_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether a Trainer checkpoint holds FSDP's sharded model (a distributed checkpoint)."""
    return (Path(folder) / SHARDED_MODEL_DIR / ".metadata").is_file()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors, sharded or not (a collective under
    FSDP: every rank calls it)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def save_sharded(
    folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Model and optimizer state, each rank its shard, as one distributed checkpoint."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_sharded(
    folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Restore :func:`save_sharded`'s checkpoint into a model sharded the same way (or over
    another number of ranks: DCP reshards on load)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
