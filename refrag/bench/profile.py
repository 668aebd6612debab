"""What one prefill costs besides arithmetic: operator counts (CPU) and kernel launches with
the GPU's busy time (CUDA), read from :mod:`torch.profiler`."""

from __future__ import annotations

import os
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

# ATen ops that only make a view or read metadata: no kernel runs for them on a GPU
VIEW_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "view",
        "reshape",
        "transpose",
        "slice",
        "select",
        "unsqueeze",
        "squeeze",
        "expand",
        "as_strided",
        "alias",
        "detach",
        "detach_",
        "t",
        "permute",
        "lift_fresh",
        "_unsafe_view",
        "empty",
        "empty_strided",
        "result_type",
        "is_nonzero",
        "item",
        "_local_scalar_dense",
        "contiguous",
        "resolve_conj",
        "resolve_neg",
        "split",
        "chunk",
        "unbind",
        "narrow",
    )
)


@dataclass
class OpProfile:
    """One call of a function under the profiler."""

    ops: Counter  # top-level ATen ops by name (an op called by another op is not counted)
    kernels: int  # device activities (kernels, memcpy, memset; CUDA), else 0
    device_busy_ms: float  # their summed device time (CUDA; overlaps count twice), else 0.0
    wall_ms: float  # the call's wall time under the profiler

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def compute(self) -> int:
        """Top-level ops that are not views or metadata (each launches work on a GPU)."""
        return sum(n for name, n in self.ops.items() if name not in VIEW_OPS)

    def summary(self) -> dict[str, Any]:
        return {
            "aten_ops": self.total,
            "aten_compute_ops": self.compute,
            "cat_ops": self.ops.get("aten::cat", 0),
            "kernels": self.kernels,
            "device_busy_ms": round(self.device_busy_ms, 3),
            "wall_ms": round(self.wall_ms, 3),
        }


def profile_call(fn: Callable[[], Any], device: torch.device | str = "cpu") -> OpProfile:
    """Run ``fn`` once unprofiled (warm-up) and once under :mod:`torch.profiler`; count its
    top-level ATen ops and, on CUDA, its kernels and their summed device time."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - start) * 1000
    ops: Counter = Counter()
    kernels, busy_us = 0, 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
            busy_us += event.time_range.elapsed_us()
            continue
        parent = event.cpu_parent
        if event.name.startswith("aten::") and not (parent and parent.name.startswith("aten::")):
            ops[event.name] += 1
    return OpProfile(ops, kernels, busy_us / 1000, wall)


def environment(device: torch.device | str) -> dict[str, Any]:
    """What the figures ran on: card, versions, and (CUDA) the SDPA kernels allowed."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "card": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "sdpa_flash": torch.backends.cuda.flash_sdp_enabled(),
            "sdpa_mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        }
    else:
        env |= {"card": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    return env
