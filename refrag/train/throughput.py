"""What a training run achieved and how it ran, for ``training_log.json``: the strategy read
from the live trainer (not copied from the config), samples/s, tokens/s and MFU.

Tokens of a sample are the positions the GPU processes: decoder positions plus encoder
tokens (chunk rows × their width). FLOPs per token of a sub-model with N parameters: 2N
forward, 2N more where backward passes through it (something before it trains), 2N more
where its weights train (Kaplan et al.'s 6N for a trained model; attention's quadratic
term is left out: REFRAG's sequences are short). MFU divides the achieved FLOP/s by the
card's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`, by name) times the processes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from accelerate.utils import is_compiled_module

# dense bf16 tensor-core peak per card, TFLOP/s (vendor data sheets; SXM parts)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_flops(device_name: str | None = None) -> float | None:
    """The dense bf16 peak of ``device_name`` (default: CUDA device 0) in FLOP/s; ``None`` for
    a CPU or an unknown card."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name(0)
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name in device_name:
            return tflops * 1e12
    return None


def flops_per_token(params: int, trains: bool, backward_through: bool) -> float:
    return 2.0 * params * (1 + int(backward_through) + int(trains))


def sample_flops(
    *,
    encoder_params: int,
    decoder_params: int,
    encoder_tokens: float,
    decoder_tokens: float,
    train_encoder: bool,
    train_projector: bool,
    train_decoder: bool,
) -> float:
    """Training FLOPs of one sample (forward and backward; see the module doc)."""
    upstream = train_encoder or train_projector
    return encoder_tokens * flops_per_token(
        encoder_params, train_encoder, False
    ) + decoder_tokens * flops_per_token(decoder_params, train_decoder, upstream)


def tokens_per_sample(examples: Iterable[Any], limit: int = 256) -> tuple[float, float]:
    """Mean (encoder tokens, decoder positions) of the first ``limit`` examples built by
    :meth:`RefragTokenizer.encode_parts` (others count zero): read from the examples alone,
    never through a collator (whose random state the run's data depend on)."""
    encoder = decoder = n = 0
    for i, example in enumerate(examples):
        if i >= limit:
            break
        n += 1
        if isinstance(example, dict) and "input_ids" in example:
            decoder += len(example["input_ids"])
            rows = example.get("chunk_rows") or []
            encoder += sum(len(ids) for ids, _mask in rows)  # (ids with CLS/SEP, mask)
    return (encoder / n, decoder / n) if n else (0.0, 0.0)


def ran_strategy(trainer: Any) -> dict[str, Any]:
    """How the trainer actually ran: accelerate's distributed type (FSDP, MULTI_GPU,
    MULTI_CPU (DDP over gloo), NO), the processes, the mixed precision, activation
    checkpointing and whether the model it trained was ``torch.compile``'d."""
    accelerator = trainer.accelerator
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    strategy = {"FSDP": "fsdp", "MULTI_GPU": "ddp", "MULTI_CPU": "ddp", "NO": "single"}
    ran = {
        "strategy": strategy.get(kind, kind.lower()),
        "distributed_type": kind,
        "world_size": trainer.args.world_size,
        "mixed_precision": str(accelerator.mixed_precision),
        "activation_checkpointing": bool(
            trainer.args.gradient_checkpointing
            or (trainer.args.fsdp_config or {}).get("activation_checkpointing")
        ),
        "compiled": is_compiled_module(trainer.model_wrapped),
    }
    if kind == "FSDP":
        ran["fsdp_version"] = getattr(accelerator.state.fsdp_plugin, "fsdp_version", None)
    return ran


def throughput(
    metrics: dict[str, float], sample_tokens: tuple[float, float], flops: float, world_size: int
) -> dict[str, float | None]:
    """samples/s (the Trainer's, all processes), tokens/s and MFU of a finished run."""
    samples = metrics.get("train_samples_per_second") or 0.0
    peak = peak_flops()
    return {
        "samples_per_second": samples,
        "tokens_per_second": samples * sum(sample_tokens),
        "flops_per_sample": flops,
        "mfu": samples * flops / (peak * world_size) if peak else None,
        "peak_flops_per_gpu": peak,
    }
