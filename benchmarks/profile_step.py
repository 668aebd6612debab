"""Where a cpt training step's time goes: the project's Trainer path against a plain loop.

    PYTHONPATH=. python benchmarks/profile_step.py --out profile_step.json          # one GPU, < 5 min
    PYTHONPATH=. python benchmarks/profile_step.py --ragged --out profile_ragged.json  # real-shard shapes
    PYTHONPATH=. python benchmarks/profile_step.py --smoke --out profile_smoke.json  # CPU

The cpt stage at batch 32 on the main job's shapes (SmolLM2-135M decoder, 30 layers; its
embeddings and first 4 layers as the chunk encoder, mean-pooled; random weights, no download):
s = 256 context tokens at k = 16 (16 chunk rows of 16 encoder tokens), 64 labelled targets,
fixed-shape synthetic batches (those of benchmarks/gpu_check.py). ``--ragged`` cuts each sample
to between half and all of its chunks and targets (:class:`RaggedWindows`), so that, as with
the real shards, the decoder length, the chunk-row count and the padding mask change every
step: against the fixed run it shows what shape changes and masked attention cost the host
(the top host and device ops name the attention backend that ran). ``--smoke`` keeps the layer
counts, sequence lengths and batch but makes every hidden size tiny, so that on a CPU the
host's per-op overhead is what shows.

Each mode runs in its own process (a fresh accelerate state; all but ``plain`` and
``plain-compile`` as one torchrun rank would: RANK/WORLD_SIZE/LOCAL_RANK set, world 1):

- ``plain``: forward with labels, backward, fused AdamW step, zero_grad; bf16 autocast on CUDA;
  the batches already on the device;
- ``plain-compile``: the same loop on ``torch.compile(model)`` (one graph per forward and
  backward: :class:`RefragModel`'s training forward reads nothing from the device); the
  compile falls in the warmup steps;
- ``plain-ddp`` / ``plain-fsdp``: the same loop on the model wrapped in DDP, or sharded with
  :func:`refrag.train.sharding.shard_model` (FSDP2, bf16 parameters, fp32 masters; no autocast):
  what the wrapper alone costs;
- ``trainer-ddp``: :class:`RefragTrainer` with the TrainingArguments keys that
  :func:`refrag.train.runner.train_stage` sets (cosine schedule, logging every 5 steps, grad-norm
  clipping, bf16, 4 pinned dataloader workers, non-blocking copies, no FSDP): DDP on one GPU;
- ``trainer-compile``: ``trainer-ddp`` with ``parallel.compile`` (the Trainer's
  ``torch_compile``), as a run with ``parallel: {compile: true}`` trains;
- ``trainer-fsdp``: the same with :func:`refrag.train.sharding.trainer_fsdp_args` (FSDP2), as
  gpu_check runs it (CUDA only: accelerate shards only on accelerators).

For each: samples/s over ``--steps`` timed steps after ``--warmup``; then ``torch.profiler`` over
``--profile-steps`` steps: host time per step of the step's parts (forward, encode_chunks,
backward, clipping, optimizer, logging, batch fetch), the top host ops (CPU total and self), the
top device ops, kernel launches per step, the GPU-busy fraction (union of device intervals over
the profiled steps' wall time), host syncs per step (cudaStreamSynchronize, .item(), nonzero …)
with the code that caused them, and the GPU-bound ceiling (batch / device-busy seconds per
step). A one-line verdict and a JSON (``--out``) close the run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch.autograd import DeviceType
from transformers import Trainer, TrainerCallback, TrainingArguments

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import CONTEXT, TARGET, K, Windows, collate, cpt_sample_flops  # noqa: E402
from gpu_check import pair as gpu_check_pair  # noqa: E402

from refrag.modeling import RefragConfig, RefragModel  # noqa: E402
from refrag.train.launch import Parallel  # noqa: E402
from refrag.train.sharding import shard_model, trainer_fsdp_args  # noqa: E402
from refrag.train.throughput import peak_flops, ran_strategy  # noqa: E402
from refrag.train.trainers import RefragTrainer  # noqa: E402

MODES = (
    "plain",
    "plain-compile",
    "plain-ddp",
    "trainer-ddp",
    "trainer-compile",
    "plain-fsdp",
    "trainer-fsdp",
)
ONE_PROCESS = ("plain", "plain-compile")  # no process group
SYNC_OPS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "aten::_local_scalar_dense",  # .item(), int(t), bool(t)
    "aten::nonzero",  # masked_select, boolean indexing
)
LAUNCH_PREFIXES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel")
REGION = "step::"
TARGET_RATE = 600  # samples/s at batch 32 on one H200: the target


def say(*parts) -> None:
    print(*parts, flush=True)


# -- shapes and batches ------------------------------------------------------------------------
def pair(smoke: bool) -> RefragConfig:
    """The main job's pair (:func:`gpu_check.pair`): SmolLM2-135M's shapes, its embeddings and
    first 4 layers as the encoder; ``smoke``: the same layer counts and heads, tiny widths."""
    config = gpu_check_pair("default")
    if smoke:
        for sub in (config.decoder, config.encoder):
            sub.vocab_size, sub.hidden_size, sub.intermediate_size = 2048, 72, 128
            sub.head_dim = sub.hidden_size // sub.num_attention_heads
    return config


class RaggedWindows(torch.utils.data.Dataset):
    """:class:`gpu_check.Windows` cut to lengths that vary as the real shards' do (windows at
    a document's end): sample i keeps the first c of its s/k chunks (c uniform in s/2k … s/k)
    and the first t of its o targets (t uniform in o/2 … o). Batched by :func:`ragged_collate`,
    the decoder length, the chunk-row count and the padding mask change from step to step."""

    def __init__(self, n: int, config: RefragConfig, seed: int = 0):
        full, g = Windows(n, config, seed), torch.Generator().manual_seed(seed + 1)
        chunks = CONTEXT // K
        self.samples = []
        for i in range(n):
            c = int(torch.randint(chunks // 2, chunks + 1, (1,), generator=g))
            t = int(torch.randint(TARGET // 2, TARGET + 1, (1,), generator=g))
            ids = full.ids[i]
            self.samples.append(
                {
                    "input_ids": torch.cat([ids[: 1 + c], ids[1 + chunks : 1 + chunks + t]]),
                    "chunk_ids": full.chunk_ids[i, :c],
                }
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.samples[i]

    def sample_flops(self, model: RefragModel) -> float:
        """Training FLOPs of the mean sample (padding not counted: MFU counts useful work)."""
        return cpt_sample_flops(
            model,
            chunk_rows=sum(len(r["chunk_ids"]) for r in self.samples) / len(self),
            positions=sum(len(r["input_ids"]) for r in self.samples) / len(self),
        )


def ragged_collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-padded, as the stages' collator pads: BOS, the sample's chunk positions, its
    labelled targets, then padding (masked out, unlabelled)."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask, chunk_mask = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    labels = torch.full_like(ids, -100)
    for b, r in enumerate(rows):
        n, c = len(r["input_ids"]), len(r["chunk_ids"])
        ids[b, :n], mask[b, :n] = r["input_ids"], 1
        chunk_mask[b, 1 : 1 + c] = True
        labels[b, 1 + c : n] = r["input_ids"][1 + c :]
    chunk_ids = torch.cat([r["chunk_ids"] for r in rows])
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "chunk_mask": chunk_mask,
        "labels": labels,
        "chunk_input_ids": chunk_ids,
        "chunk_attention_mask": torch.ones_like(chunk_ids),
    }


def samples(args, n: int, config: RefragConfig):
    """The mode's dataset and collator: fixed shapes, or ``--ragged``."""
    if args.ragged:
        return RaggedWindows(n, config), ragged_collate
    return Windows(n, config), collate


def regions() -> None:
    """Label the step's parts for the profiler (record_function around each)."""

    def wrap(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def labelled(*args, **kwargs):
            with torch.profiler.record_function(REGION + label):
                return original(*args, **kwargs)

        setattr(owner, name, labelled)

    wrap(RefragModel, "forward", "forward")
    wrap(RefragModel, "encode_chunks", "encode_chunks")
    wrap(RefragModel, "embed_inputs", "embed_inputs")
    wrap(Accelerator, "backward", "backward")
    wrap(Trainer, "get_batch_samples", "get_batch_samples")
    wrap(Trainer, "training_step", "training_step")
    wrap(Trainer, "_clip_grad_norm", "clip_grad_norm")
    wrap(AcceleratedOptimizer, "step", "optimizer")
    wrap(Trainer, "_maybe_log_save_evaluate", "log_save_evaluate")
    wrap(Trainer, "floating_point_ops", "floating_point_ops")
    wrap(Trainer, "_track_num_input_tokens", "track_num_input_tokens")


# -- the profile -------------------------------------------------------------------------------
def summarize_profile(prof, steps: int, cuda: bool, trace: str | None = None) -> dict:
    """Per-step figures of a finished profiler (``steps`` active steps); ``trace``: a Chrome
    trace file to write too. A failure is reported, not raised: the timing stands."""
    try:
        return read_profile(prof, steps, cuda, trace)
    except Exception as err:  # noqa: BLE001 - the samples/s still count
        return {"error": f"{type(err).__name__}: {err}"}


def read_profile(prof, steps: int, cuda: bool, trace: str | None) -> dict:
    if trace:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(trace)
    events = prof.events()
    step_events = [e for e in events if e.name.startswith("ProfilerStep")]
    window = (
        (min(e.time_range.start for e in step_events), max(e.time_range.end for e in step_events))
        if step_events
        else None
    )
    host = [e for e in events if e.device_type == DeviceType.CPU]
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    out: dict = {"profiled_steps": steps}
    if window:
        out["wall_ms_per_step"] = (window[1] - window[0]) / 1e3 / steps
    # the step's parts (main thread; nested parts count inside their parents)
    parts = collections.defaultdict(float)
    for e in host:
        if e.name.startswith(REGION):
            parts[e.name[len(REGION) :]] += e.cpu_time_total / 1e3 / steps
    out["host_ms_per_step_by_part"] = dict(sorted(parts.items(), key=lambda kv: -kv[1]))
    averages = [
        a
        for a in prof.key_averages()
        if not a.key.startswith((REGION, "ProfilerStep")) and a.device_type == DeviceType.CPU
    ]

    def row(a, value):
        return {"op": a.key, "ms_per_step": value / 1e3 / steps, "calls_per_step": a.count / steps}

    out["top_host_ops_cpu_total"] = [
        row(a, a.cpu_time_total) for a in sorted(averages, key=lambda a: -a.cpu_time_total)[:15]
    ]
    out["top_host_ops_self"] = [
        row(a, a.self_cpu_time_total)
        for a in sorted(averages, key=lambda a: -a.self_cpu_time_total)[:15]
    ]
    if cuda:
        kernels = collections.defaultdict(lambda: [0.0, 0])
        for e in device:
            kernels[e.name][0] += (e.time_range.end - e.time_range.start) / 1e3 / steps
            kernels[e.name][1] += 1
        out["top_device_ops"] = [
            {"op": name[:120], "ms_per_step": ms, "calls_per_step": n / steps}
            for name, (ms, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:12]
        ]
        out["device_events_per_step"] = len(device) / steps
        busy = (
            union_us([(e.time_range.start, e.time_range.end) for e in device], window) / 1e3 / steps
        )
        out["device_busy_ms_per_step"] = busy
        if window:
            out["gpu_busy_fraction"] = busy / out["wall_ms_per_step"]
    launches = sum(1 for e in host if e.name.startswith(LAUNCH_PREFIXES))
    out["kernel_launches_per_step"] = launches / steps
    out["aten_ops_per_step"] = sum(1 for e in host if e.name.startswith("aten::")) / steps
    by_part = collections.Counter()
    for e in host:
        if e.name.startswith(LAUNCH_PREFIXES if cuda else "aten::"):
            by_part[innermost_part(e)] += 1
    out["launches_by_part" if cuda else "aten_ops_by_part"] = {
        k: v / steps for k, v in by_part.most_common()
    }
    syncs = {name: [0, 0.0] for name in SYNC_OPS}
    culprits = collections.Counter()
    for e in host:
        if e.name in syncs:
            syncs[e.name][0] += 1
            syncs[e.name][1] += e.cpu_time_total / 1e3
            culprits[caller(e)] += 1
    out["syncs_per_step"] = {
        name: {"calls": n / steps, "ms": ms / steps} for name, (n, ms) in syncs.items() if n
    }
    out["sync_sources_per_step"] = {k: v / steps for k, v in culprits.most_common(12)}
    return out


def innermost_part(event) -> str:
    """The innermost labelled part above ``event``; ``backward (autograd thread)`` for the
    ops that CUDA's autograd engine runs on its own thread."""
    parent, top = event.cpu_parent, event
    while parent is not None and not parent.name.startswith(REGION):
        parent, top = parent.cpu_parent, parent
    if parent is not None:
        return parent.name[len(REGION) :]
    return "backward (autograd thread)" if top.name.startswith("autograd::") else "other"


def caller(event) -> str:
    """The innermost labelled part above a profiler event, and the ops between them."""
    chain, parent = [], event.cpu_parent
    while parent is not None:
        chain.append(parent.name)
        parent = parent.cpu_parent
    ops = []
    for name in chain:
        if name.startswith((REGION, "ProfilerStep")):
            part = name[len(REGION) :] if name.startswith(REGION) else name
            break
        ops.append(name)
    else:
        part = "?"
    return " > ".join([part, *reversed(ops[-3:] if len(ops) > 3 else ops), event.name])


def union_us(intervals: list[tuple[float, float]], window) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if window:
            a, b = max(a, window[0]), min(b, window[1])
            if b <= a:
                continue
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def profiler(steps: int, cuda: bool):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1),
    )


def trace_path(args) -> str | None:
    return str(Path(args.trace, f"{args.mode}.json")) if args.trace else None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- the modes (each in its own process) -------------------------------------------------------
def build(args, device: str) -> RefragModel:
    torch.manual_seed(0)
    with torch.device(device):
        model = RefragModel(pair(args.smoke))
    model.set_trainable(encoder=True, projector=True, decoder=True)  # cpt
    return model


def run_plain(args, model: RefragModel, device: str) -> dict:
    cuda = device.startswith("cuda")
    # ragged: a new batch every step, as the Trainer's would be; fixed: 4 batches in turn
    count = args.warmup + args.steps + args.profile_steps + 1 if args.ragged else 4
    data, collate_fn = samples(args, args.batch * count, model.config)
    batches = [
        {
            k: v.to(device)
            for k, v in collate_fn([data[j] for j in range(i, i + args.batch)]).items()
        }
        for i in range(0, len(data), args.batch)
    ]
    wrapped, autocast = model, contextlib.nullcontext()
    if cuda and args.mode != "plain-fsdp":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    if args.mode not in ONE_PROCESS:  # a world of one, as under torchrun
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if args.mode == "plain-compile":
        wrapped = torch.compile(model)
    elif args.mode == "plain-ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[0] if cuda else None, find_unused_parameters=False
        )
    elif args.mode == "plain-fsdp":
        wrapped = shard_model(model, bf16=cuda)  # bf16 compute, fp32 masters and reduction
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    wrapped.train()

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        with autocast:
            loss = wrapped(**batch).loss
        with torch.profiler.record_function(REGION + "backward"):
            loss.backward()
        with torch.profiler.record_function(REGION + "optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync()
    seconds = time.perf_counter() - start
    say(
        f"    timed: {args.steps * args.batch / seconds:.0f} samples/s, {1e3 * seconds / args.steps:.1f} ms/step; profiling"
    )
    with profiler(args.profile_steps, cuda) as prof:
        for i in range(args.profile_steps + 1):
            step(i)
            prof.step()
    sync()
    return {
        "timed_steps": args.steps,
        "seconds": seconds,
        "sample_flops": data.sample_flops(model),
    } | {"profile": summarize_profile(prof, args.profile_steps, cuda, trace_path(args))}


class Clock(TrainerCallback):
    """Times steps warmup+1 … warmup+steps, then profiles the next ones."""

    def __init__(self, warmup: int, steps: int, profile_steps: int, cuda: bool):
        self.warmup, self.steps, self.profile_steps, self.cuda = warmup, steps, profile_steps, cuda
        self.start = self.seconds = None
        self.prof = None

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step == self.warmup:
            sync()
            self.start = time.perf_counter()
        elif step == self.warmup + self.steps:
            sync()
            self.seconds = time.perf_counter() - self.start
            say(
                f"    timed: {self.steps * args.per_device_train_batch_size / self.seconds:.0f} samples/s; profiling"
            )
            self.prof = profiler(self.profile_steps, self.cuda)
            self.prof.__enter__()
        elif self.prof is not None and step <= self.warmup + self.steps + self.profile_steps + 1:
            self.prof.step()
            if step == self.warmup + self.steps + self.profile_steps + 1:
                sync()
                self.prof.__exit__(None, None, None)


def run_trainer(args, model: RefragModel, mode: str, work: str) -> dict:
    cuda = torch.cuda.is_available()
    parallel = Parallel(
        gpus_per_node=1 if cuda else 0,
        strategy="fsdp" if mode == "trainer-fsdp" else "ddp",
        compile=mode == "trainer-compile",
    )
    total = args.warmup + args.steps + args.profile_steps + 1
    trainer_args = TrainingArguments(  # the keys refrag.train.runner.train_stage sets
        output_dir=str(Path(work, "run")),
        max_steps=total,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        warmup_steps=0.04,
        logging_steps=5,
        save_strategy="no",
        save_total_limit=None,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        ddp_backend=None if cuda else "gloo",
        ddp_find_unused_parameters=False,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=4 if cuda else 0,
        dataloader_prefetch_factor=4 if cuda else None,
        dataloader_persistent_workers=cuda,
        dataloader_pin_memory=cuda,
        **({"accelerator_config": {"non_blocking": True}} if cuda else {}),
        seed=0,
        disable_tqdm=True,
        torch_compile=parallel.compile,
        **trainer_fsdp_args(parallel, model),
    )
    clock = Clock(args.warmup, args.steps, args.profile_steps, cuda)
    data, collate_fn = samples(args, total * args.batch, model.config)
    trainer = RefragTrainer(
        model=model,
        args=trainer_args,
        train_dataset=data,
        data_collator=collate_fn,
        callbacks=[clock],
        sequential=True,
    )
    trainer.train()
    if clock.prof is None or clock.seconds is None:
        raise RuntimeError("the Trainer stopped before the profiled steps")
    return {
        "ran": ran_strategy(trainer),
        "optimizer": type(
            trainer.optimizer.optimizer
            if hasattr(trainer.optimizer, "optimizer")
            else trainer.optimizer
        ).__name__,
        "optim": str(trainer_args.optim),
        "timed_steps": args.steps,
        "seconds": clock.seconds,
        "sample_flops": data.sample_flops(model),
        "profile": summarize_profile(clock.prof, args.profile_steps, cuda, trace_path(args)),
    }


def worker(args) -> dict:
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda:0" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(0)
    regions()
    model = build(args, device)
    with tempfile.TemporaryDirectory(prefix="profile_step-") as work:
        if args.mode.startswith("plain"):
            result = run_plain(args, model, device)
        else:
            result = run_trainer(args, model, args.mode, work)
    samples = args.steps * args.batch / result["seconds"]
    flops = result["sample_flops"]
    peak = peak_flops() if cuda else None
    busy = result["profile"].get("device_busy_ms_per_step")
    result |= {
        "mode": args.mode,
        "batch": args.batch,
        "samples_per_second": samples,
        "ms_per_step": 1e3 * result["seconds"] / args.steps,
        "flops_per_step": flops * args.batch,
        "mfu": samples * flops / peak if peak else None,
        "gpu_bound_ceiling_samples_per_second": args.batch / (busy / 1e3) if busy else None,
    }
    if cuda:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


# -- the driver --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args, mode: str, work: str) -> dict:
    out = Path(work, f"{mode}.json")
    command = [sys.executable, __file__, "--mode", mode, "--result", str(out)]
    command += ["--batch", str(args.batch), "--steps", str(args.steps)]
    command += ["--warmup", str(args.warmup), "--profile-steps", str(args.profile_steps)]
    command += ["--smoke"] if args.smoke else []
    command += ["--ragged"] if args.ragged else []
    command += ["--trace", args.trace] if args.trace else []
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if mode not in ONE_PROCESS:  # one torchrun rank of a world of one
        env |= {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
    timeout = args.compile_timeout if "compile" in mode else args.timeout
    started = time.perf_counter()
    try:
        run = subprocess.run(
            command, env=env, timeout=timeout, text=True, stdout=None, stderr=subprocess.PIPE
        )
    except subprocess.TimeoutExpired:
        return {"mode": mode, "error": f"timed out after {timeout} s"}
    if run.returncode != 0 or not out.exists():
        tail = run.stderr.strip().splitlines()[-20:]
        say("\n".join(tail))
        return {"mode": mode, "error": f"exit {run.returncode}", "log_tail": tail}
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def report(result: dict) -> None:
    if "error" in result:
        say(f"{result['mode']}: {result['error']}")
        return
    p = result["profile"]
    ran = result.get("ran", {})
    if "error" in p:
        say(
            f"{result['mode']}: {result['samples_per_second']:.0f} samples/s; profile: {p['error']}"
        )
        return
    line = f"{result['mode']}: {result['samples_per_second']:.0f} samples/s ({result['ms_per_step']:.1f} ms/step)"
    if ran:
        line += f", ran {ran['strategy']} ({ran['distributed_type']}, {ran['mixed_precision']}, optim {result['optim']})"
    if result.get("mfu") is not None:
        line += f", MFU {100 * result['mfu']:.1f}%"
    say(line)
    busy = p.get("gpu_busy_fraction")
    say(
        f"  profiled: {p.get('wall_ms_per_step', 0):.1f} ms/step wall"
        + (
            f", device busy {p['device_busy_ms_per_step']:.1f} ms ({100 * busy:.0f}%)"
            if busy is not None
            else ""
        )
        + f", {p['kernel_launches_per_step']:.0f} kernel launches/step, {p['aten_ops_per_step']:.0f} aten ops/step"
        + (
            f", GPU-bound ceiling {result['gpu_bound_ceiling_samples_per_second']:.0f} samples/s"
            if result.get("gpu_bound_ceiling_samples_per_second")
            else ""
        )
    )
    say(
        "  host ms/step by part: "
        + ", ".join(f"{k} {v:.1f}" for k, v in p["host_ms_per_step_by_part"].items())
    )
    counts = p.get("launches_by_part") or p.get("aten_ops_by_part") or {}
    say(
        ("  kernel launches" if "launches_by_part" in p else "  aten ops")
        + "/step by innermost part: "
        + ", ".join(f"{k} {v:.0f}" for k, v in counts.items())
    )
    say(
        "  syncs/step: "
        + (
            ", ".join(
                f"{k} {v['calls']:.1f}x {v['ms']:.1f} ms" for k, v in p["syncs_per_step"].items()
            )
            or "none"
        )
    )
    for source, n in p["sync_sources_per_step"].items():
        say(f"    {n:.1f}x {source}")
    say("  top host ops (CPU total ms/step, calls/step):")
    for r in p["top_host_ops_cpu_total"][:12]:
        say(f"    {r['ms_per_step']:8.2f} {r['calls_per_step']:7.1f}  {r['op']}")
    say("  top host ops (self CPU ms/step, calls/step):")
    for r in p["top_host_ops_self"][:10]:
        say(f"    {r['ms_per_step']:8.2f} {r['calls_per_step']:7.1f}  {r['op']}")
    if p.get("top_device_ops"):
        say("  top device ops (ms/step, calls/step):")
        for r in p["top_device_ops"][:10]:
            say(f"    {r['ms_per_step']:8.2f} {r['calls_per_step']:7.1f}  {r['op']}")


def verdict(results: dict[str, dict]) -> str:
    ok = {m: r for m, r in results.items() if "error" not in r}
    if not ok:
        return "verdict: no mode ran"
    parts = []
    plain = ok.get("plain")
    for mode, r in ok.items():
        p = r["profile"]
        if "error" in p:
            parts.append(f"{mode} {r['samples_per_second']:.0f}/s (no profile)")
            continue
        busy = p.get("gpu_busy_fraction")
        host = p["host_ms_per_step_by_part"]
        leaves = ("forward", "backward", "optimizer", "clip_grad_norm", "log_save_evaluate")
        top = max(
            ((k, v) for k, v in host.items() if k in (*leaves, "get_batch_samples")),
            key=lambda kv: kv[1],
            default=("?", 0.0),
        )
        sync_ms = sum(v["ms"] for k, v in p["syncs_per_step"].items() if k.startswith("cuda"))
        bound = (
            "host-bound"
            if busy is not None and busy < 0.6
            else ("GPU-bound" if busy is not None else "host (CPU run)")
        )
        text = f"{mode} {r['samples_per_second']:.0f}/s {bound}"
        if busy is not None:
            text += f" (GPU busy {100 * busy:.0f}%, ceiling {r['gpu_bound_ceiling_samples_per_second']:.0f}/s)"
        text += f", {p['kernel_launches_per_step']:.0f} launches, most host time in {top[0]} {top[1]:.0f} ms"
        if sync_ms:
            text += f", {sync_ms:.0f} ms blocked in syncs"
        if plain is not None and mode != "plain":
            text += f", {r['ms_per_step'] - plain['ms_per_step']:+.0f} ms/step vs plain"
        parts.append(text)
    profiled = {m: r for m, r in ok.items() if "error" not in r["profile"]}
    if profiled:
        mode, best = max(profiled.items(), key=lambda kv: kv[1]["samples_per_second"])
        busy = best["profile"].get("gpu_busy_fraction")
        ceiling = best.get("gpu_bound_ceiling_samples_per_second")
        if busy is None:
            parts.append("the ceiling needs a GPU run")
        elif busy < 0.6:
            parts.append(
                f"ceiling set by host overhead: the fastest ({mode}) keeps the GPU busy only "
                f"{100 * busy:.0f}% of the step; its GPU work alone allows {ceiling:.0f}/s "
                f"({'above' if ceiling >= TARGET_RATE else 'below'} the {TARGET_RATE}/s target): "
                "fewer launches (CUDA graphs, torch.compile, fused ops) are the lever"
            )
        else:
            parts.append(
                f"ceiling set by the GPU's work: {ceiling:.0f}/s at {100 * busy:.0f}% busy ({mode})"
            )
    return "verdict: " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="profile_step.json")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny widths, same depths and lengths"
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES)
    )
    parser.add_argument(
        "--ragged",
        action="store_true",
        help="batches whose lengths and padding change every step, as the real shards'",
    )
    parser.add_argument("--batch", type=int, default=None, help="default 32; smoke 4")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="default 5; smoke 2")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=110, help="seconds per eager mode")
    parser.add_argument(
        "--compile-timeout", type=int, default=330, help="seconds per compiled mode"
    )
    parser.add_argument("--trace", help="a folder for each mode's Chrome trace (large)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or (4 if args.smoke else 32)
    args.steps = args.steps or (3 if args.smoke else 20)
    args.warmup = args.warmup or (2 if args.smoke else 5)
    if args.mode:  # a worker
        result = worker(args)
        Path(args.result).write_text(json.dumps(result, indent=2, default=str))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("profile_step: no CUDA device (use --smoke for the CPU version)")
    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "card": torch.cuda.get_device_name(0) if cuda else "cpu",
        "smoke": args.smoke,
        "ragged": args.ragged,
        "batch": args.batch,
        "modes": {},
    }
    say(
        f"profile_step: {out['card']}, torch {out['torch']}, transformers {out['transformers']}, batch {args.batch}"
        + (", ragged batches" if args.ragged else ", fixed-shape batches")
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="profile_step-") as work:
        for mode in args.modes.split(","):
            if mode == "trainer-fsdp" and not cuda:  # accelerate would run DDP
                out["modes"][mode] = {"mode": mode, "error": "skipped: FSDP needs CUDA"}
                continue
            say(f"{mode} …")
            out["modes"][mode] = result = spawn(args, mode, work)
            report(result)
            Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    out["verdict"] = verdict(out["modes"])
    out["wall_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    say(out["verdict"])
    say(f"profile_step: {out['wall_s']:.0f} s, {args.out}")


if __name__ == "__main__":
    main()
