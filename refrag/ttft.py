"""Time to first token (TTFT) of REFRAG against the fastest plain decoder, in one run.

For every context length s and compression k, batch 1, after warm-up, the median of
``repeats`` interleaved runs of:

- baseline: the plain decoder prefills BOS + s context tokens + q question tokens, in the
  fastest configuration measured in this run (attention implementations × eager launch or
  CUDA graph; see :func:`baseline_candidates`);
- REFRAG cached: the s/k chunk embeddings come from a warm :class:`ChunkEmbeddingCache`
  (hashing and lookup included; also timed alone as ``cache_lookup_ms``), the decoder
  prefills BOS + s/k + q positions;
- REFRAG recomputed: the encoder and projector run on the s/k chunk rows first.

Each run starts from token ids on the host and ends when the greedy first token is back on
the host. Every row records what ran, read from the model (attention implementation of
each path, dtype, device, graph mode), and the analytic limit for its real position counts;
a ratio above that limit is reported as suspect (``speedup_* = None`` with the reason in
``suspect``), never as a result. ``python benchmarks/ttft.py --help`` lists the options::

    python benchmarks/ttft.py --device cpu --contexts 2048 --k 8,16,32 --json ttft.json
    python benchmarks/ttft.py --device cuda --decoder-shape llama2-7b --encoder-shape roberta-large \\
        --contexts 2048,4096,8192,16384 --k 8,16,32 --cuda-graph --json ttft.json --plot ttft.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from refrag.chunk_cache import ChunkEmbeddingCache
from refrag.inference import (
    decode_step,
    default_dtype,
    prefill,
    try_static_runner,
)
from refrag.modeling import RefragConfig, RefragModel, attn_implementations
from refrag.models import DEFAULT_CACHE_DIR, DEFAULT_DECODER, DEFAULT_ENCODER, resolve_model

DECODER_SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        rms_norm_eps=1e-5,
    ),
    "llama2-13b": dict(
        model_type="llama",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        rms_norm_eps=1e-5,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}
ENCODER_SHAPES: dict[str, dict[str, Any]] = {
    "roberta-large": dict(
        model_type="roberta",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        vocab_size=50265,
        max_position_embeddings=514,
        pad_token_id=1,
    ),
    "roberta-base": dict(
        model_type="roberta",
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        vocab_size=50265,
        max_position_embeddings=514,
        pad_token_id=1,
    ),
    "minilm-l6": dict(
        model_type="bert",
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=12,
        vocab_size=30522,
    ),
    "tiny": dict(
        model_type="bert",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=512,
    ),
}
ROW_KEYS = (
    "context",
    "k",
    "baseline_ms",
    "baseline_attn",
    "baseline_graph",
    "refrag_cached_ms",
    "refrag_recomputed_ms",
    "cache_lookup_ms",
    "speedup_cached",
    "speedup_recomputed",
    "analytic_limit",
    "suspect",
    "attn",
    "refrag_graph",
    "dtype",
    "device",
)


def shape_config(spec: str, shapes: dict[str, dict[str, Any]], min_positions: int = 0):
    """``NAME[:key=value,…]`` → a config of that shape (values parsed as JSON where they can)."""
    from transformers import AutoConfig

    name, _, overrides = spec.partition(":")
    if name not in shapes:
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(shapes)}")
    values = dict(shapes[name])
    for item in filter(None, overrides.split(",")):
        key, _, raw = item.partition("=")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    if values["model_type"] == "llama":
        values.setdefault("max_position_embeddings", max(4096, min_positions))
    return AutoConfig.for_model(values.pop("model_type"), **values)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> RefragModel:
    """Encoder + random projector + decoder, from specs or from random-weight shapes."""
    from transformers import AutoModel, AutoModelForCausalLM

    if not (args.decoder_shape or args.encoder_shape):
        model = RefragModel.from_encoder_decoder_pretrained(
            encoder_name_or_path=str(resolve_model(args.encoder, args.cache_dir)),
            decoder_name_or_path=str(resolve_model(args.decoder, args.cache_dir)),
            dtype=dtype,
            attn_implementation=args.attn,
            compression=max(args.k),
        )
        return model.to(device).eval()
    kw = {"dtype": dtype, "attn_implementation": args.attn}
    longest = max(args.contexts) + args.question_tokens + args.new_tokens + 2
    with torch.device(device):
        if args.decoder_shape:
            decoder = AutoModelForCausalLM.from_config(
                shape_config(args.decoder_shape, DECODER_SHAPES, longest), **kw
            )
        else:
            decoder = AutoModelForCausalLM.from_pretrained(
                resolve_model(args.decoder, args.cache_dir), **kw
            )
        if args.encoder_shape:
            encoder = AutoModel.from_config(shape_config(args.encoder_shape, ENCODER_SHAPES), **kw)
        else:
            encoder = AutoModel.from_pretrained(resolve_model(args.encoder, args.cache_dir), **kw)
    config = RefragConfig(encoder=encoder.config, decoder=decoder.config, compression=max(args.k))
    return (
        RefragModel(config, encoder=encoder, decoder=decoder).to(device=device, dtype=dtype).eval()
    )


def attn_of(module: torch.nn.Module) -> str:
    """The attention implementation the layers of ``module`` dispatch on right now."""
    return "+".join(sorted(str(a) for a in attn_implementations(module)))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@contextlib.contextmanager
def decoder_attn(model: RefragModel, attn: str) -> Iterator[None]:
    """Run the block with the decoder's layers on ``attn``; restore the previous setting."""
    before = model.decoder.config._attn_implementation
    if attn != before:
        model.decoder.set_attn_implementation(attn)
    try:
        yield
    finally:
        if attn != before:
            model.decoder.set_attn_implementation(before)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paper_limit(k: int, d: int, s: int) -> float:
    """The paper's TTFT acceleration limit k²(6d+s)/(6dk+s) (s context tokens only)."""
    return k * k * (6 * d + s) / (6 * d * k + s)


def analytic_limit(d: int, baseline_positions: int, refrag_positions: int) -> float:
    """The paper's cost model n(6d+n) per prefill of n positions, for the position counts
    actually fed (BOS and question tokens included): the ratio no TTFT speedup can beat."""
    return (
        baseline_positions
        * (6 * d + baseline_positions)
        / (refrag_positions * (6 * d + refrag_positions))
    )


def make_inputs(
    model: RefragModel, s: int, k: int, q: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random host-side ids: the full prompt, and the compressed prompt with its chunk rows."""
    vocab, enc_vocab = model.config.decoder.vocab_size, model.config.encoder.vocab_size
    context = torch.randint(5, vocab, (1, s), generator=gen)
    question = torch.randint(5, vocab, (1, q), generator=gen)
    bos = torch.ones(1, 1, dtype=torch.long)
    n = s // k
    placeholders = torch.zeros(1, n, dtype=torch.long)
    rows = torch.randint(5, enc_vocab, (n, k + 2), generator=gen)  # [CLS] t_1 … t_k [SEP]
    rows[:, 0], rows[:, -1] = 1, 2
    chunk_mask = torch.cat([torch.zeros(1, 1), torch.ones(1, n), torch.zeros(1, q)], dim=1).bool()
    return {
        "full_ids": torch.cat([bos, context, question], dim=1),
        "ids": torch.cat([bos, placeholders, question], dim=1),
        "chunk_mask": chunk_mask,
        "rows": rows,
        "row_mask": torch.ones_like(rows),
    }


class Prompt:
    """One prompt shape, read eagerly (:func:`prefill`) or by a captured
    :class:`~refrag.inference.StaticRunner` (``graph=True`` on CUDA). ``graph`` afterwards
    says what runs (capture can fail and fall back to eager)."""

    def __init__(
        self,
        model: RefragModel,
        x: dict[str, torch.Tensor],
        device: torch.device,
        full: bool,
        graph: bool,
        new_tokens: int,
    ):
        self.model, self.x, self.device = model, x, device
        self.ids = x["full_ids"] if full else x["ids"]
        self.chunk_mask = None if full else x["chunk_mask"].to(device)
        self.runners: dict[str, Any] = {}
        if graph:
            positions = None if full else x["chunk_mask"][0].nonzero().view(-1)
            for mode in ("cached",) if full else ("cached", "recomputed"):
                self.runners[mode] = try_static_runner(
                    model,
                    self.ids.shape[1],
                    chunk_positions=positions,
                    encode=mode == "recomputed",
                    row_width=x["rows"].shape[1],
                    max_new_tokens=new_tokens + 2,
                    graph=True,
                )
        self.graph = bool(self.runners) and all(self.runners.values())

    def to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def plain(self) -> int:
        """Greedy first token of the plain decoder over the full prompt."""
        if self.graph:
            return int(self.runners["cached"].prefill(self.ids))
        return int(prefill(self.model, self.to(self.ids)).next_token[0])

    def cached(self, cache: ChunkEmbeddingCache) -> int:
        embeds = cache.encode(self.model, self.x["rows"], self.x["row_mask"])
        if self.graph:
            return int(self.runners["cached"].prefill(self.ids, embeds))
        return int(
            prefill(
                self.model, self.to(self.ids), chunk_mask=self.chunk_mask, chunk_embeds=embeds
            ).next_token[0]
        )

    def recomputed(self) -> int:
        rows, mask = self.x["rows"], self.x["row_mask"]
        if self.graph:
            return int(self.runners["recomputed"].prefill(self.ids, None, rows, mask))
        with torch.inference_mode():
            embeds = self.model.encode_chunks(self.to(rows), self.to(mask))
        return int(
            prefill(
                self.model, self.to(self.ids), chunk_mask=self.chunk_mask, chunk_embeds=embeds
            ).next_token[0]
        )

    def ttit_ms(self, steps: int) -> float:
        """Median decode step after a prefill of this prompt (2 warm-up steps); graph mode
        replays the runner's captured static-cache step."""
        sync(self.device)
        if self.graph:
            runner = self.runners["cached"]
            embeds = None
            if self.chunk_mask is not None:
                embeds = self.model.encode_chunks(
                    self.to(self.x["rows"]), self.to(self.x["row_mask"])
                )
            runner.prefill(self.ids, embeds)
            step = runner.decode
        else:
            chunks = {}
            if self.chunk_mask is not None:
                chunks = {
                    "chunk_mask": self.chunk_mask,
                    "chunk_input_ids": self.to(self.x["rows"]),
                    "chunk_attention_mask": self.to(self.x["row_mask"]),
                }
            state = prefill(self.model, self.to(self.ids), **chunks)
            token = state.next_token

            def step() -> None:
                nonlocal token
                token = decode_step(self.model, token, state.cache).argmax(-1)

        times = []
        for i in range(steps + 2):
            ms = timed_ms(step, self.device)
            if i >= 2:
                times.append(ms)
        return statistics.median(times)


def timed_ms(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1000


@dataclass
class Candidate:
    """A plain-decoder configuration the baseline may use."""

    attn: str
    graph: bool

    @property
    def label(self) -> str:
        return f"{self.attn}{'+graph' if self.graph else ''}"


def baseline_candidates(device: torch.device, attns: list[str] | None) -> list[Candidate]:
    """What the baseline may run: every attention implementation given (default: sdpa and
    eager on a CPU; sdpa, plus flash_attention_2 where the package is installed, on CUDA),
    each launched eagerly and, on CUDA, also replayed as a CUDA graph."""
    if attns is None:
        attns = ["sdpa", "eager"] if device.type == "cpu" else ["sdpa"]
        if device.type == "cuda":
            import importlib.util

            if importlib.util.find_spec("flash_attn") is not None:
                attns.append("flash_attention_2")
    graphs = [False, True] if device.type == "cuda" else [False]
    return [Candidate(a, g) for a in attns for g in graphs]


def choose_baseline(
    model: RefragModel,
    x: dict[str, torch.Tensor],
    device: torch.device,
    candidates: list[Candidate],
    args: argparse.Namespace,
) -> tuple[Prompt, str, dict[str, float]]:
    """Time every candidate (after warm-up, the median of ``baseline_trials`` runs); return
    the fastest one's prompt, its attention implementation and every candidate's time, keyed
    by what actually ran (read from the model)."""
    best, best_ms, times = None, float("inf"), {}
    for cand in candidates:
        with decoder_attn(model, cand.attn):
            try:
                prompt = Prompt(model, x, device, True, cand.graph, args.new_tokens)
            except Exception as exc:  # an implementation this machine lacks
                warnings.warn(f"baseline candidate {cand.label} unavailable: {exc}", stacklevel=2)
                continue
            if cand.graph and not prompt.graph:
                continue
            ran = Candidate(attn_of(model.decoder), prompt.graph)
            for _ in range(args.warmup):
                prompt.plain()
            ms = statistics.median(
                timed_ms(prompt.plain, device) for _ in range(args.baseline_trials)
            )
        times[ran.label] = round(ms, 3)
        if ms < best_ms:
            best, best_ms = (prompt, ran), ms
    if best is None:
        raise RuntimeError("no baseline configuration could run")
    return best[0], best[1].attn, times


def measure_context(
    model: RefragModel,
    s: int,
    gen: torch.Generator,
    device: torch.device,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Rows for one context length, one per k. The timed runs are interleaved (each repeat
    times the baseline once, then every k's lookup, cached and recomputed) so that a machine
    that slows down mid-run skews no ratio."""
    ks, q = args.k, args.question_tokens
    xs = {k: make_inputs(model, s, k, q, gen) for k in ks}
    base, base_attn, candidates = choose_baseline(
        model, xs[ks[0]], device, baseline_candidates(device, args.baseline_attn), args
    )
    refrag_attn = attn_of(model.decoder)
    tasks: dict[tuple[str, int], tuple[Callable[[], Any], str]] = {
        ("baseline", 0): (base.plain, base_attn)
    }
    prompts = {}
    for k in ks:
        prompt = prompts[k] = Prompt(model, xs[k], device, False, args.cuda_graph, args.new_tokens)
        cache = ChunkEmbeddingCache(max_entries=None)
        rows, mask = xs[k]["rows"], xs[k]["row_mask"]
        cache.encode(model, rows, mask)  # warm: these chunks were seen before
        tasks["lookup", k] = (lambda c=cache, r=rows, m=mask: c.encode(model, r, m), refrag_attn)
        tasks["cached", k] = (lambda p=prompt, c=cache: p.cached(c), refrag_attn)
        tasks["recomputed", k] = (prompt.recomputed, refrag_attn)
    for _ in range(args.warmup):
        for fn, attn in tasks.values():
            with decoder_attn(model, attn):
                fn()
    times: dict[tuple[str, int], list[float]] = {key: [] for key in tasks}
    for _ in range(args.repeats):
        for key, (fn, attn) in tasks.items():
            with decoder_attn(model, attn):  # switched outside the timed region
                times[key].append(timed_ms(fn, device))
    with decoder_attn(model, base_attn):
        base_ttit = base.ttit_ms(args.new_tokens)
    d, n = model.config.decoder.hidden_size, args.new_tokens
    base_ms = statistics.median(times["baseline", 0])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []
    for k in ks:
        cached_ms = statistics.median(times["cached", k])
        recomputed_ms = statistics.median(times["recomputed", k])
        ttit = prompts[k].ttit_ms(n)
        positions = (xs[k]["full_ids"].shape[1], xs[k]["ids"].shape[1])
        limit = analytic_limit(d, *positions)
        row = {
            "context": s,
            "k": k,
            "baseline_ms": round(base_ms, 3),
            "baseline_attn": base_attn,
            "baseline_graph": base.graph,
            "baseline_candidates_ms": candidates,
            "refrag_cached_ms": round(cached_ms, 3),
            "refrag_recomputed_ms": round(recomputed_ms, 3),
            "cache_lookup_ms": round(statistics.median(times["lookup", k]), 3),
            "speedup_cached": round(base_ms / cached_ms, 3),
            "speedup_recomputed": round(base_ms / recomputed_ms, 3),
            "analytic_limit": round(limit, 2),
            "paper_limit": round(paper_limit(k, d, s), 2),
            "suspect": {},
            "baseline_positions": positions[0],
            "refrag_positions": positions[1],
            "baseline_ttit_ms": round(base_ttit, 3),
            "refrag_ttit_ms": round(ttit, 3),
            "baseline_tokens_per_s": round(n / ((base_ms + (n - 1) * base_ttit) / 1000), 2),
            "refrag_tokens_per_s": round(n / ((cached_ms + (n - 1) * ttit) / 1000), 2),
            "new_tokens": n,
            "attn": refrag_attn,
            "encoder_attn": attn_of(model.encoder),
            "refrag_graph": prompts[k].graph,
            "device": device_name(device),
            "dtype": str(next(model.decoder.parameters()).dtype).removeprefix("torch."),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "load_avg": None if load is None else round(load, 2),
        }
        flag_over_limit(row)
        rows.append(row)
    return rows


def flag_over_limit(row: dict[str, Any]) -> None:
    """A ratio above the analytic limit is a bug until found: replace it by ``None``, keep
    the measured value and the likely cause in ``row["suspect"]`` and warn."""
    for mode in ("cached", "recomputed"):
        ratio = row[f"speedup_{mode}"]
        if ratio is None or ratio <= row["analytic_limit"]:
            continue
        causes = []
        if row.get("load_avg") and row.get("threads") and row["load_avg"] > row["threads"]:
            causes.append(
                f"a busy machine (load {row['load_avg']} on {row['threads']} threads) slows the"
                " long baseline prefill more than the short REFRAG ones"
            )
        fastest = min(row["baseline_candidates_ms"].values(), default=row["baseline_ms"])
        if row["baseline_ms"] > 1.5 * fastest:
            causes.append(
                f"timing noise: the baseline's repeats ({row['baseline_ms']} ms) were slower"
                f" than its selection run ({fastest} ms)"
            )
        if not causes:
            causes.append(
                "the baseline is slower than a plain decoder should be, or the REFRAG path"
                " skips work"
            )
        cause = "; ".join(causes)
        message = (
            f"{ratio}x above the analytic limit {row['analytic_limit']}x; likely cause: {cause}"
        )
        row["suspect"][f"speedup_{mode}"] = message
        row[f"speedup_{mode}"] = None
        print(
            f"WARNING s={row['context']} k={row['k']} {mode}: {message}; not reported as a result",
            file=sys.stderr,
        )


def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else default_dtype(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args, device, dtype)
    if args.compile:
        model.decoder.forward = torch.compile(model.decoder.forward, dynamic=False)
    dec_name = args.decoder_shape and f"shape:{args.decoder_shape}" or args.decoder
    enc_name = args.encoder_shape and f"shape:{args.encoder_shape}" or args.encoder
    gen = torch.Generator().manual_seed(args.seed)
    warm = make_inputs(model, 64, 16, args.question_tokens, gen)  # first-call costs out of the way
    for _ in range(2):
        prefill(model, warm["full_ids"].to(device))
        prefill(
            model,
            warm["ids"].to(device),
            chunk_mask=warm["chunk_mask"].to(device),
            chunk_input_ids=warm["rows"].to(device),
            chunk_attention_mask=warm["row_mask"].to(device),
        )
    args.cuda_graph = args.cuda_graph and device.type == "cuda"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and load > (os.cpu_count() or 1) - torch.get_num_threads() + 0.5:
        print(
            f"WARNING: load average {load:.2f} on {os.cpu_count()} cores before the"
            f" {torch.get_num_threads()}-thread benchmark: other work shares the CPU, and the"
            " timings (the short REFRAG prefills most) will be slow and noisy",
            file=sys.stderr,
        )
    rows: list[dict[str, Any]] = []
    for s in tqdm(args.contexts, desc="ttft", unit="context", file=sys.stderr, disable=args.quiet):
        with torch.inference_mode():
            for row in measure_context(model, s, gen, device, args):
                row |= {
                    "decoder": dec_name,
                    "encoder": enc_name,
                    "compile": bool(args.compile),
                    "warmup": args.warmup,
                    "repeats": args.repeats,
                }
                rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return f"{'suspect':>10}"
    return f"{value:>10.2f}" if isinstance(value, float) else f"{value!s:>10}"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "s",
        "k",
        "base ms",
        "baseline",
        "lookup ms",
        "cached ms",
        "recomp ms",
        "x cached",
        "x recomp",
        "limit",
        "TTIT base",
        "TTIT refrag",
    )
    lines = [" | ".join(f"{h:>10}" for h in head)]
    for r in rows:
        cells = (
            r["context"],
            r["k"],
            r["baseline_ms"],
            r["baseline_attn"] + ("+graph" if r["baseline_graph"] else ""),
            r["cache_lookup_ms"],
            r["refrag_cached_ms"],
            r["refrag_recomputed_ms"],
            r["speedup_cached"],
            r["speedup_recomputed"],
            r["analytic_limit"],
            r["baseline_ttit_ms"],
            r["refrag_ttit_ms"],
        )
        lines.append(" | ".join(_cell(c) for c in cells))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Speedup against s: one colour per k; cached solid, recomputed dashed, limit dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, k in enumerate(sorted({r["k"] for r in rows})):
        sub = sorted((r for r in rows if r["k"] == k), key=lambda r: r["context"])
        s = [r["context"] for r in sub]
        color = f"C{i}"
        nan = float("nan")  # a suspect ratio (None) is not drawn
        cached = [nan if r["speedup_cached"] is None else r["speedup_cached"] for r in sub]
        recomputed = [
            nan if r["speedup_recomputed"] is None else r["speedup_recomputed"] for r in sub
        ]
        ax.plot(s, cached, "o-", color=color, label=f"k={k} cached")
        ax.plot(s, recomputed, "s--", color=color, label=f"k={k} recomputed")
        ax.plot(
            s, [r["analytic_limit"] for r in sub], ":", color=color, alpha=0.6, label=f"k={k} limit"
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length s (tokens)")
    ax.set_ylabel("TTFT speedup over the fastest plain decoder")
    r0 = rows[0]
    ax.set_title(f"REFRAG TTFT: {r0['decoder']} on {r0['device']} ({r0['dtype']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]"
    )
    p.add_argument(
        "--contexts",
        type=ints,
        default=None,
        help="context lengths s (default: 2048 on cpu, 2048,4096,8192,16384 on cuda)",
    )
    p.add_argument(
        "--k", type=ints, default=[8, 16, 32], help="compression rates (default 8,16,32)"
    )
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--plot", type=Path, help="write the speedup-vs-s plot here (png, pdf, svg)")
    p.add_argument(
        "--decoder", default=DEFAULT_DECODER, help="decoder spec (hf:…, embedded:…, folder)"
    )
    p.add_argument("--encoder", default=DEFAULT_ENCODER, help="encoder spec")
    p.add_argument(
        "--decoder-shape",
        help=f"random weights of a shape: {', '.join(DECODER_SHAPES)} [:key=value,…]",
    )
    p.add_argument(
        "--encoder-shape",
        help=f"random weights of a shape: {', '.join(ENCODER_SHAPES)} [:key=value,…]",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--attn",
        default="sdpa",
        help="REFRAG's attention implementation: sdpa, flash_attention_2, eager",
    )
    p.add_argument(
        "--baseline-attn",
        type=lambda t: [a for a in t.split(",") if a],
        help="attention implementations the baseline may use; the fastest wins"
        " (default: sdpa,eager on cpu; sdpa and, where installed, flash_attention_2 on cuda)",
    )
    p.add_argument(
        "--baseline-trials",
        type=int,
        default=1,
        help="timed runs per baseline candidate when choosing the fastest",
    )
    p.add_argument(
        "--question-tokens", type=int, default=16, help="prompt tokens after the context"
    )
    p.add_argument(
        "--new-tokens", type=int, default=16, help="decode steps for TTIT and throughput"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="REFRAG prefills and decode steps as captured CUDA graphs (the baseline tries"
        " both on a GPU anyway)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder forward")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument(
        "--cache-dir", default=str(DEFAULT_CACHE_DIR), help="where model specs resolve to"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.contexts is None:
        args.contexts = [2048, 4096, 8192, 16384] if args.device.startswith("cuda") else [2048]
    bad = [(s, k) for s in args.contexts for k in args.k if s % k]
    if bad:
        p.error(f"every context length must be a multiple of every k: {bad}")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from refrag.utils import quiet_transformers

    quiet_transformers()
    args = parse_args(argv)
    rows = bench(args)
    r0 = rows[0]
    print(
        f"TTFT, batch 1, median of {args.repeats} after {args.warmup} warm-up: decoder"
        f" {r0['decoder']}, encoder {r0['encoder']}, {r0['device']}, {r0['dtype']};"
        f" REFRAG attention {r0['attn']}{' + CUDA graphs' if r0['refrag_graph'] else ''}"
        f"{', compiled' if args.compile else ''}; baseline = the fastest of"
        f" {', '.join(r0['baseline_candidates_ms'])} ({r0['baseline_attn']}"
        f"{' + CUDA graph' if r0['baseline_graph'] else ''})"
        + (f"; {r0['threads']} threads, load {r0['load_avg']}" if r0["threads"] else "")
    )
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
