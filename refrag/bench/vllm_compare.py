"""REFRAG on vLLM against plain vLLM, on the same prompts, in one engine.

For every context length s and compression k: ``prompts`` random prompts (BOS, s context
tokens, q question tokens; random weights of named shapes, nothing downloaded). The plain
path gives vLLM the full prompt's token ids; REFRAG gives it the mixed sequence's
embeddings (:func:`refrag.serve.vllm_engine.prompt_embeds`) with the chunk embeddings from a
warm chunk cache (``cached``) or from the encoder (``recomputed``). Per request, batch 1:
TTFT is from host ids to the first token back (``max_tokens=1``; embedding time included),
TTIT the median extra time per token of ``1 + new_tokens`` against 1 (EOS ignored); then all prompts in one
``generate`` call give the throughput. vLLM's prefix cache is off, and every timed prompt is
new to the engine, so no request reuses another's KV. The first tokens of both REFRAG paths
are compared with the Hugging Face REFRAG prefill of the same prompt (``agreement``)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from refrag.bench.profile import environment
from refrag.bench.shapes import build_model
from refrag.bench.timing import make_inputs
from refrag.serve import vllm_engine
from refrag.serve.chunk_cache import ChunkEmbeddingCache
from refrag.serve.inference import prefill
from refrag.serve.vllm_engine import (
    VllmRefragEngine,
    export_decoder,
    output_token_ids,
    prompt_embeds,
)


def _batch(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": x["ids"],
        "chunk_mask": x["chunk_mask"],
        "chunk_input_ids": x["rows"],
        "chunk_attention_mask": x["row_mask"],
    }


def _timed(fn) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return (time.perf_counter() - start) * 1000, out


def measure(
    engine: VllmRefragEngine, s: int, k: int, gen: torch.Generator, args: argparse.Namespace
) -> dict[str, Any]:
    """One row: the plain and REFRAG paths on the same ``args.prompts`` prompts."""
    model, n = engine.model, args.new_tokens
    xs = [make_inputs(model, s, k, args.question_tokens, gen) for _ in range(args.prompts + 1)]
    cache = ChunkEmbeddingCache(max_entries=None)
    for x in xs:
        cache.encode(model, x["rows"], x["row_mask"])  # `cached`: these chunks were seen

    def plain(x, tokens):
        return engine.generate_ids([x["full_ids"][0].tolist()], tokens, ignore_eos=True)

    def refrag(x, tokens, cached):
        model.use_chunk_cache(cache if cached else None)
        try:
            return engine.generate_embeds(prompt_embeds(model, _batch(x)), tokens, ignore_eos=True)
        finally:
            model.use_chunk_cache(None)

    paths = {
        "plain": plain,
        "cached": lambda x, t: refrag(x, t, True),
        "recomputed": lambda x, t: refrag(x, t, False),
    }
    ttft: dict[str, list[float]] = {p: [] for p in paths}
    longer: dict[str, list[float]] = {p: [] for p in paths}
    first: dict[str, list[int]] = {p: [] for p in paths}
    for i, x in enumerate(xs):  # xs[0] warms every path up and is not counted
        for name, fn in paths.items():
            ms, out = _timed(lambda fn=fn, x=x: fn(x, 1))
            ms_n, _ = _timed(lambda fn=fn, x=x: fn(x, 1 + n))
            if i:
                ttft[name].append(ms)
                longer[name].append(ms_n)
                first[name].append(output_token_ids(out)[0][0])
    hf = [int(prefill(model, **_model_inputs(model, x)).next_token[0]) for x in xs[1:]]
    row: dict[str, Any] = {"context": s, "k": k, "prompts": args.prompts, "new_tokens": n}
    for name in paths:
        t1, tn = statistics.median(ttft[name]), statistics.median(longer[name])
        row[f"{name}_ttft_ms"] = round(t1, 3)
        row[f"{name}_ttit_ms"] = round((tn - t1) / n, 3) if n else None
    for name in ("cached", "recomputed"):
        row[f"speedup_{name}"] = round(row["plain_ttft_ms"] / row[f"{name}_ttft_ms"], 3)
        row[f"agreement_{name}"] = sum(a == b for a, b in zip(first[name], hf)) / len(hf)
    batch = xs[1:]
    ids = [x["full_ids"][0].tolist() for x in batch]
    ms, outs = _timed(lambda: engine.generate_ids(ids, n, ignore_eos=True))
    row["plain_tokens_per_s"] = round(sum(map(len, output_token_ids(outs))) / ms * 1000, 2)
    model.use_chunk_cache(cache)
    try:
        embeds = [prompt_embeds(model, _batch(x))[0] for x in batch]
        ms, outs = _timed(lambda: engine.generate_embeds(embeds, n, ignore_eos=True))
    finally:
        model.use_chunk_cache(None)
    row["cached_tokens_per_s"] = round(sum(map(len, output_token_ids(outs))) / ms * 1000, 2)
    row["positions"] = {"plain": xs[1]["full_ids"].shape[1], "refrag": xs[1]["ids"].shape[1]}
    return row


def _model_inputs(model, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in _batch(x).items()}


def vllm_version() -> str | None:
    """The installed vLLM's version (``None`` without vLLM)."""
    return getattr(vllm_engine.vllm, "__version__", None)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Build the random-weight model, export its decoder, start vLLM once, measure every
    (s, k); each row carries the environment (card, dtype, versions)."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    model = build_model(args, device, dtype)
    env = environment(device) | {"dtype": args.dtype, "vllm": vllm_version()}
    # the shapes' position table covers the longest prompt plus the new tokens (build_model)
    longest = model.config.decoder.max_position_embeddings
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_decoder(model, None, args.decoder_dir or Path(tmp) / "decoder")
        engine = VllmRefragEngine(
            model,
            None,
            folder,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=longest,
            enable_prefix_caching=False,
            enforce_eager=args.enforce_eager,
        )
        env["vllm_settings"] = {
            k: v for k, v in engine.llm_kwargs.items() if k not in ("model", "skip_tokenizer_init")
        }
        gen = torch.Generator().manual_seed(args.seed)
        rows = []
        with torch.inference_mode():
            for s in args.contexts:
                for k in args.k:
                    rows.append(measure(engine, s, k, gen, args) | {"environment": env})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = ("s", "k", "plain ms", "cached ms", "recomp ms", "x cached", "x recomp")
    head += ("TTIT plain", "TTIT refrag", "tok/s plain", "tok/s refrag", "agree")
    lines = [" | ".join(f"{h:>11}" for h in head)]
    for r in rows:
        cells = (
            r["context"],
            r["k"],
            r["plain_ttft_ms"],
            r["cached_ttft_ms"],
            r["recomputed_ttft_ms"],
            r["speedup_cached"],
            r["speedup_recomputed"],
            r["plain_ttit_ms"],
            r["cached_ttit_ms"],
            r["plain_tokens_per_s"],
            r["cached_tokens_per_s"],
            f"{r['agreement_cached']:.0%}",
        )
        lines.append(" | ".join(f"{c!s:>11}" for c in cells))
    return "\n".join(lines)
