"""The GPU check anyone can run offline: FSDP training through the real Trainer path.

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check.json      # one H100/H200, < 6 min
    PYTHONPATH=. python benchmarks/gpu_check.py --smoke --out smoke.json  # CPU, tiny, 2 gloo ranks

Needs torch, transformers and accelerate only: no download (random weights of the default
model shapes, SmolLM2-135M with its own embeddings and first 4 layers as the chunk encoder
(mean-pooled rows of k tokens, as ``config/config.yaml``'s default), and of a LLaMA-2-7B-shaped
decoder with a RoBERTa-large-shaped encoder), no data (fixed-shape synthetic cpt batches: s = 256 context
tokens at k = 16, o = 64 targets, ready as tensors). It starts torchrun itself, one phase per
torchrun (``--nproc_per_node=1`` on a GPU):

1. ``default``: the cpt stage at batch 32 under FSDP2 (the project's Trainer keys,
   :func:`refrag.train.sharding.trainer_fsdp_args`), bf16; a sharded checkpoint midway;
   samples/s, tokens/s and MFU over the steps after warm-up; GPU utilization (NVML, when
   present); peak memory against :mod:`refrag.train.memory`'s estimate; the strategy read
   from the live accelerator; NCCL's version and an all-reduce;
2. ``resume``: a new process resumes from that sharded checkpoint (the resume check learns
   the distributed-checkpoint format): its first loss must match the first run's at the same
   step, and the stage's end is a plain HF folder that ``from_pretrained`` reads;
3. ``7b``: the 7B-shaped pair, FSDP2 with activation checkpointing, a few steps: peak memory
   against the estimate (cpt where it fits the card, else reconstruct with the decoder frozen).

``--smoke`` runs the same on CPU with tiny shapes and two gloo processes; there the Trainer
runs DDP (accelerate shards only on accelerators) and the report says so.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REQUIRED = ("torch", "transformers", "accelerate")
ROOT = Path(__file__).resolve().parents[1]

try:  # one line, not a traceback, where the machine lacks a package
    for _name in REQUIRED:
        importlib.import_module(_name)
except ImportError as err:
    raise SystemExit(f"gpu_check: needs {', '.join(REQUIRED)}; missing: {err.name}") from None

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import BertConfig, LlamaConfig, TrainerCallback, TrainingArguments  # noqa: E402

sys.path.insert(0, str(ROOT))
from refrag.modeling import RefragConfig, RefragModel  # noqa: E402
from refrag.modeling.modeling_refrag import default_pooling  # noqa: E402
from refrag.train.launch import Parallel  # noqa: E402
from refrag.train.memory import Shapes, Workload, estimate_peak  # noqa: E402
from refrag.train.resume import check_checkpoint_files  # noqa: E402
from refrag.train.sharding import full_state_dict, trainer_fsdp_args  # noqa: E402
from refrag.train.stages import StageConfig  # noqa: E402
from refrag.train.throughput import peak_flops, ran_strategy, sample_flops  # noqa: E402
from refrag.train.trainers import RefragTrainer  # noqa: E402

K, CONTEXT, TARGET = 16, 256, 64


def row_width(config: RefragConfig) -> int:
    """Encoder tokens per chunk row: k, plus [CLS] and [SEP] for a BERT-style encoder (a
    decoder's lower layers add none, as the SmolLM2 tokenizer adds no BOS)."""
    return K + 2 if config.encoder.model_type in ("bert", "roberta") else K


def cpt_sample_flops(
    model: RefragModel,
    train_decoder: bool = True,
    chunk_rows: float = CONTEXT // K,
    positions: float = 1 + CONTEXT // K + TARGET,
) -> float:
    """Training FLOPs of one cpt sample of ``chunk_rows`` chunk rows and ``positions`` decoder
    positions (by default a synthetic sample's: s/k rows, BOS + s/k + o positions)."""
    return sample_flops(
        encoder_params=model.encoder.num_parameters(),
        decoder_params=model.decoder.num_parameters(),
        encoder_tokens=chunk_rows * row_width(model.config),
        decoder_tokens=positions,
        train_encoder=True,
        train_projector=True,
        train_decoder=train_decoder,
    )


# -- shapes ----------------------------------------------------------------------------------
def pair(kind: str) -> RefragConfig:
    """``default``: SmolLM2-135M with its first 4 layers as the encoder (the main job's pair);
    ``7b``: LLaMA-2-7B + RoBERTa-large; ``tiny``: a few layers (--smoke)."""
    if kind == "7b":
        decoder = LlamaConfig(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
        )
        encoder = BertConfig(  # RoBERTa-large's shapes (BERT's code: the same layers)
            vocab_size=50265,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            max_position_embeddings=514,
        )
    elif kind == "tiny":
        decoder = LlamaConfig(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        encoder = BertConfig(
            vocab_size=1024,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    else:  # SmolLM2-135M; the encoder: its embeddings and first 4 layers (a LlamaModel)
        smollm2 = {
            "vocab_size": 49152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "max_position_embeddings": 8192,
        }
        decoder = LlamaConfig(**smollm2, num_hidden_layers=30, tie_word_embeddings=True)
        encoder = LlamaConfig(**smollm2, num_hidden_layers=4)
    for sub in (decoder, encoder):
        sub._attn_implementation = "sdpa"
    return RefragConfig(
        encoder=encoder, decoder=decoder, compression=K, chunk_pooling=default_pooling(encoder)
    )


class Windows(torch.utils.data.Dataset):
    """Fixed-shape cpt samples, ready as tensors: BOS, s/k chunk positions, o labelled tokens;
    s/k chunk rows of :func:`row_width` encoder tokens."""

    def __init__(self, n: int, config: RefragConfig, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        chunks, positions = CONTEXT // K, 1 + CONTEXT // K + TARGET
        dec_vocab, enc_vocab = config.decoder.vocab_size, config.encoder.vocab_size
        self.ids = torch.randint(3, dec_vocab, (n, positions), generator=g)
        self.chunk_ids = torch.randint(3, enc_vocab, (n, chunks, row_width(config)), generator=g)
        self.chunk_mask = torch.zeros(positions, dtype=torch.bool)
        self.chunk_mask[1 : 1 + chunks] = True

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "chunk_ids": self.chunk_ids[i]}

    def sample_flops(self, model: RefragModel) -> float:
        """Training FLOPs of a sample (all are the same size)."""
        return cpt_sample_flops(model)


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacking only: every tensor was made when the dataset was."""
    ids = torch.stack([r["input_ids"] for r in rows])
    chunk_ids = torch.cat([r["chunk_ids"] for r in rows])
    chunk_mask = torch.zeros_like(ids, dtype=torch.bool)
    chunk_mask[:, 1 : 1 + CONTEXT // K] = True
    labels = ids.masked_fill(chunk_mask, -100)
    labels[:, 0] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "chunk_mask": chunk_mask,
        "labels": labels,
        "chunk_input_ids": chunk_ids,
        "chunk_attention_mask": torch.ones_like(chunk_ids),
    }


# -- one phase, under torchrun ----------------------------------------------------------------
class StepClock(TrainerCallback):
    """Wall time of the steps after ``warmup`` (the GPU synchronized at both ends) and the
    GPU's utilization sampled meanwhile (NVML, where pynvml is installed)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0
        self.utilization: list[float] = []
        self._stop = threading.Event()

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self._sync()
            self.start = time.perf_counter()
            self._sample()
        elif state.global_step > self.warmup:
            self.steps += 1

    def on_train_end(self, args, state, control, **kwargs):
        self._sync()
        self.end = time.perf_counter()
        self._stop.set()

    def _sample(self):
        if not torch.cuda.is_available():
            return
        index = torch.cuda.current_device()
        try:
            import pynvml  # noqa: PLC0415 - optional, GPU machines only

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)

            def read() -> float:
                return pynvml.nvmlDeviceGetUtilizationRates(handle).gpu

        except Exception:  # noqa: BLE001 - no NVML bindings: ask nvidia-smi
            query = ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu"]

            def read() -> float:
                text = subprocess.run(
                    [*query, "--format=csv,noheader,nounits"], capture_output=True, text=True
                ).stdout
                return float(text.strip().splitlines()[0])

        def loop():
            while not self._stop.wait(0.2):
                try:
                    self.utilization.append(read())
                except Exception:  # noqa: BLE001 - no figure rather than a failed run
                    return

        threading.Thread(target=loop, daemon=True).start()

    def seconds(self) -> float | None:
        return None if self.start is None or self.end is None else self.end - self.start


def estimate(model: RefragModel, stage: str, hp: StageConfig, parallel: Parallel) -> dict:
    chunks = CONTEXT // K
    work = Workload(1 + chunks + TARGET, TARGET, chunks, row_width(model.config))
    est = estimate_peak(
        stage,
        hp,
        work,
        encoder=Shapes.of(model.config.encoder.to_dict(), causal=False),
        decoder=Shapes.of(model.config.decoder.to_dict(), causal=True),
        projector=sum(p.numel() for p in model.projector.parameters()),
        parallel=parallel,
    )
    return est.as_dict()


def phase(args) -> dict:
    """One training run (the worker side of a torchrun)."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    kind = "tiny" if args.smoke else ("7b" if args.phase == "7b" else "default")
    config = pair(kind)
    torch.manual_seed(0)
    with torch.device(f"cuda:{local_rank}" if cuda else "cpu"):
        model = RefragModel(config)
    stage = args.stage
    trains_decoder = stage == "cpt"
    model.set_trainable(encoder=True, projector=True, decoder=trains_decoder)
    batch = args.batch
    hp = StageConfig(batch_size=batch, train_decoder=trains_decoder, target_tokens=TARGET)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = Parallel(
        gpus_per_node=world if cuda else 0,
        strategy="fsdp",
        activation_checkpointing=args.phase == "7b",
    )
    expected = estimate(model, stage, hp, parallel)
    work = Path(args.work)
    steps = args.steps
    trainer_args = TrainingArguments(
        output_dir=str(work / "run"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or steps,
        save_total_limit=None,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        ddp_backend=None if cuda else "gloo",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=4 if cuda else 0,
        dataloader_pin_memory=cuda,
        **({"accelerator_config": {"non_blocking": True}} if cuda else {}),
        seed=0,
        disable_tqdm=True,
        **(trainer_fsdp_args(parallel, model) if (cuda or world > 1) else {}),
    )
    clock = StepClock(warmup=min(args.warmup, steps - 1))
    dataset = Windows(steps * batch * world, config)
    trainer = RefragTrainer(
        model=model,
        args=trainer_args,
        train_dataset=dataset,
        data_collator=collate,
        callbacks=[clock],
        sequential=True,  # the same order on resume
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train(resume_from_checkpoint=args.resume_from)
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    out = {
        "phase": args.phase,
        "stage": stage,
        "batch_per_gpu": batch,
        "ran": ran_strategy(trainer),
        "losses": losses,
        "metrics": result.metrics,
        "estimate": expected,
    }
    if cuda:
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        out["estimate_ratio"] = expected["tensors"] / torch.cuda.max_memory_allocated()
    seconds = clock.seconds()
    if seconds and clock.steps:
        samples = clock.steps * batch * world / seconds
        chunk_tokens = (CONTEXT // K) * row_width(model.config)
        flops = cpt_sample_flops(model, train_decoder=trains_decoder)
        peak = peak_flops()
        out |= {
            "samples_per_second": samples,
            "tokens_per_second": samples * (chunk_tokens + 1 + CONTEXT // K + TARGET),
            "mfu": samples * flops / (peak * world) if peak else None,
            "gpu_utilization_pct": (
                sum(clock.utilization) / len(clock.utilization) if clock.utilization else None
            ),
        }
    if torch.distributed.is_initialized():
        value = torch.ones(1, device="cuda" if cuda else "cpu")
        torch.distributed.all_reduce(value)
        out["all_reduce"] = {"backend": torch.distributed.get_backend(), "sum": value.item()}
        if cuda:
            version = torch.cuda.nccl.version()
            out["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else version
    if args.save_final:  # the stage's end: a plain HF folder
        weights = full_state_dict(model) if trainer.is_fsdp_enabled else None
        if trainer.is_world_process_zero():
            model.save_pretrained(work / "final", state_dict=weights)
            reloaded = RefragModel.from_pretrained(work / "final")
            out["final_folder_params"] = reloaded.num_parameters()
    if args.save_steps and trainer.is_world_process_zero():
        ckpt = work / "run" / f"checkpoint-{args.save_steps}"
        check_checkpoint_files(ckpt)  # raises if the checkpoint is not complete
        out["checkpoint"] = {
            "path": str(ckpt),
            "files": sorted(p.name for p in ckpt.iterdir()),
        }
    return out


# -- the driver -------------------------------------------------------------------------------
def torchrun(args, name: str, extra: list[str], timeout: float) -> dict:
    nproc = 2 if args.smoke else 1
    out = Path(args.work, f"{name}.json")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        __file__,
        "--phase",
        name,
        "--work",
        args.work,
        "--result",
        str(out),
        *(["--smoke"] if args.smoke else []),
        *extra,
    ]
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("OMP_NUM_THREADS", "1" if args.smoke else "8")
    started = time.perf_counter()
    try:
        run = subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"phase": name, "error": f"timed out after {timeout:.0f} s"}
    if run.returncode != 0:
        tail = (run.stdout + run.stderr).strip().splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
        return {"phase": name, "error": f"exit {run.returncode}", "log_tail": tail}
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, 2 gloo ranks")
    parser.add_argument("--skip-7b", action="store_true", help="leave out the 7B-shaped phase")
    # worker options (set by the driver)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--stage", default="cpt", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=40, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--save-steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--resume-from", help=argparse.SUPPRESS)
    parser.add_argument("--save-final", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:  # a torchrun worker
        result = phase(args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.result).write_text(json.dumps(result, indent=2, default=str))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --smoke for the CPU version)")
    report = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": importlib.import_module("accelerate").__version__,
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "card_memory_gib": (
            torch.cuda.get_device_properties(0).total_memory / 2**30
            if torch.cuda.is_available()
            else None
        ),
        "peak_bf16_tflops": (peak_flops() or 0) / 1e12 or None,
        "phases": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        args.work = work
        steps, save = (6, 3) if args.smoke else (40, 20)
        batch = "4" if args.smoke else "32"
        report["phases"]["default"] = first = torchrun(
            args,
            "default",
            ["--steps", str(steps), "--warmup", "2" if args.smoke else "10"]
            + ["--save-steps", str(save), "--batch", batch],
            timeout=150,
        )
        ckpt = Path(work, "run", f"checkpoint-{save}")
        report["phases"]["resume"] = resumed = torchrun(
            args,
            "resume",
            ["--steps", str(save + 2), "--warmup", "0", "--batch", batch]
            + ["--resume-from", str(ckpt), "--save-final"],
            timeout=120,
        )
        if "losses" in first and "losses" in resumed:
            step = str(save + 1)
            a, b = first["losses"].get(step), resumed["losses"].get(step)
            report["resume_loss"] = {"step": step, "first_run": a, "resumed": b}
            report["resume_matches"] = (
                a is not None and b is not None and abs(a - b) <= 0.02 * abs(a)
            )
        if not args.skip_7b:
            report["phases"]["7b"] = seven_b(args, report)
    report["wall_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    summarize(report)


def seven_b(args, report: dict) -> dict:
    """The 7B-shaped pair: cpt where its estimate fits the card, else reconstruct."""
    if args.smoke:
        return torchrun(args, "7b", ["--steps", "3", "--warmup", "1", "--batch", "2"], 120)
    card = report["card_memory_gib"]
    config = pair("7b")
    with torch.device("meta"):
        model = RefragModel(config)
    parallel = Parallel(gpus_per_node=1, strategy="fsdp", activation_checkpointing=True)
    tried = {}
    for stage in ("cpt", "reconstruct"):
        hp = StageConfig(batch_size=8, train_decoder=stage == "cpt", target_tokens=TARGET)
        need = estimate(model, stage, hp, parallel)["gib"]
        if need > 0.92 * card:
            tried[stage] = f"estimate ~{need:.0f} GiB over 92% of the card"
            continue
        extra = ["--stage", stage, "--steps", "8", "--warmup", "3", "--batch", "8"]
        result = torchrun(args, "7b", extra, timeout=170)
        if "error" not in result:
            return result | {"not_run": tried}
        tried[stage] = result["error"]  # e.g. out of memory: the frozen-decoder stage next
    return {"phase": "7b", "skipped": f"no stage ran: {tried}"}


def summarize(report: dict) -> None:
    print(
        f"gpu_check: {report['card']}, torch {report['torch']}, transformers "
        f"{report['transformers']}, accelerate {report['accelerate']}, {report['wall_s']:.0f} s"
    )
    for name, p in report["phases"].items():
        if "error" in p or "skipped" in p:
            print(f"  {name}: {p.get('error') or p.get('skipped')}")
            continue
        ran = p["ran"]
        line = f"  {name} ({p['stage']}, batch {p['batch_per_gpu']}): ran {ran['strategy']}"
        line += f" ({ran['distributed_type']}, {ran['world_size']} proc, {ran['mixed_precision']})"
        if p.get("samples_per_second"):
            line += f", {p['samples_per_second']:.0f} samples/s, {p['tokens_per_second']:.0f} tok/s"
        if p.get("mfu") is not None:
            line += f", MFU {100 * p['mfu']:.1f}%"
        if p.get("gpu_utilization_pct") is not None:
            line += f", GPU busy {p['gpu_utilization_pct']:.0f}%"
        if "peak_allocated_gib" in p:
            line += (
                f", peak {p['peak_allocated_gib']:.1f} GiB allocated vs estimate "
                f"{p['estimate']['tensors'] / 2**30:.1f} (ratio {p['estimate_ratio']:.2f})"
            )
        if "nccl" in p:
            line += f", NCCL {p['nccl']}"
        print(line)
    if "resume_loss" in report:
        r = report["resume_loss"]
        print(
            f"  resume from the step-{int(r['step']) - 1} checkpoint: step {r['step']} loss {r['first_run']} "
            f"(first run) vs {r['resumed']} (resumed): {'ok' if report['resume_matches'] else 'MISMATCH'}"
        )


if __name__ == "__main__":
    main()
