"""Timing one prompt shape: the plain decoder's candidate configurations, REFRAG cached and
recomputed, each from host ids to the first token back on the host."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from refrag.bench.profile import profile_call
from refrag.modeling import RefragModel, attn_implementations
from refrag.serve.chunk_cache import ChunkEmbeddingCache
from refrag.serve.inference import decode_step, prefill, try_static_runner


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
    :class:`~refrag.serve.inference.StaticRunner` (``graph=True`` on CUDA). ``graph`` afterwards
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


def ttit_ms(
    model: RefragModel,
    x: dict[str, torch.Tensor],
    device: torch.device,
    full: bool,
    graph: bool,
    steps: int,
) -> tuple[float | None, str]:
    """Median decode step after a prefill of the plain (``full``) or compressed prompt, and
    the decode machinery that ran, read from the live objects: ``graph=False`` steps
    :func:`decode_step` eagerly against the prefill's cache; ``graph=True`` replays the
    captured decode step of a :class:`StaticRunner` (static cache). The same ``graph`` on
    both sides gives both the same machinery. ``(None, reason)`` when capture fails."""
    ids = x["full_ids"] if full else x["ids"]
    chunks = {}
    if not full:
        chunks = {
            "chunk_mask": x["chunk_mask"].to(device),
            "chunk_input_ids": x["rows"].to(device),
            "chunk_attention_mask": x["row_mask"].to(device),
        }
    if graph:
        runner = try_static_runner(
            model,
            ids.shape[1],
            chunk_positions=None if full else x["chunk_mask"][0].nonzero().view(-1),
            max_new_tokens=steps + 4,
            graph=True,
        )
        if runner is None or runner._decode_graph is None:
            return None, "CUDA-graph capture failed"
        embeds = None
        if not full:
            with torch.inference_mode():
                embeds = model.encode_chunks(
                    chunks["chunk_input_ids"], chunks["chunk_attention_mask"]
                )
        runner.prefill(ids, embeds)
        step = runner.decode
        machinery = f"{type(runner.cache).__name__} + CUDA-graph replay"
    else:
        state = prefill(model, ids.to(device), **chunks)
        token = state.next_token
        machinery = f"{type(state.cache).__name__}, eager"

        def step() -> None:
            nonlocal token
            token = decode_step(model, token, state.cache).argmax(-1)

    sync(device)
    times = []
    for i in range(steps + 2):  # 2 warm-up steps
        ms = timed_ms(step, device)
        if i >= 2:
            times.append(ms)
    return statistics.median(times), machinery


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
        if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
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


def decode_times(
    model: RefragModel,
    xs: dict[int, dict[str, torch.Tensor]],
    device: torch.device,
    base_attn: str,
    refrag_attn: str,
    args: argparse.Namespace,
) -> dict[tuple[str, str, int], tuple[float | None, str]]:
    """TTIT of both sides with the same decode machinery: eager (dynamic cache) always, and
    on CUDA also CUDA-graph replay (static cache). Keys: (machinery, side, k)."""
    out = {}
    modes = ["eager", "graph"] if device.type == "cuda" else ["eager"]
    first = xs[args.k[0]]
    for mode in modes:
        with decoder_attn(model, base_attn):
            out[mode, "baseline", 0] = ttit_ms(
                model, first, device, True, mode == "graph", args.new_tokens
            )
        with decoder_attn(model, refrag_attn):
            for k in args.k:
                out[mode, "refrag", k] = ttit_ms(
                    model, xs[k], device, False, mode == "graph", args.new_tokens
                )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def ttit_columns(
    ttit: dict[tuple[str, str, int], tuple[float | None, str]],
    k: int,
    base_ms: float,
    cached_ms: float,
    n: int,
) -> dict[str, Any]:
    """A row's TTIT columns: per machinery, both sides' step times and what ran (a side
    whose machinery differs from the other's, or failed, leaves both times ``None``)."""
    cols: dict[str, Any] = {}
    for mode, suffix in (("eager", ""), ("graph", "_graph")):
        base, refrag = ttit.get((mode, "baseline", 0)), ttit.get((mode, "refrag", k))
        if base is None or refrag is None:
            cols |= {f"baseline_ttit{suffix}_ms": None, f"refrag_ttit{suffix}_ms": None}
            cols[f"ttit{suffix}_machinery"] = "not measured (no CUDA)"
            continue
        same = base[0] is not None and refrag[0] is not None and base[1] == refrag[1]
        cols[f"baseline_ttit{suffix}_ms"] = round(base[0], 3) if same else None
        cols[f"refrag_ttit{suffix}_ms"] = round(refrag[0], 3) if same else None
        cols[f"ttit{suffix}_machinery"] = (
            base[1] if same else f"differs: baseline {base[1]}, refrag {refrag[1]}"
        )
    b, r = cols["baseline_ttit_ms"], cols["refrag_ttit_ms"]
    cols["baseline_tokens_per_s"] = b and round(n / ((base_ms + (n - 1) * b) / 1000), 2)
    cols["refrag_tokens_per_s"] = r and round(n / ((cached_ms + (n - 1) * r) / 1000), 2)
    return cols


def prefill_profiles(model, tasks, device, base_attn, ks) -> dict[tuple[str, int], dict]:
    """One profiled run (after the timed ones) of the baseline and of each k's cached
    prefill, as timed: ATen ops, kernels and the device's busy time (:mod:`.profile`)."""
    out = {}
    for key in [("baseline", 0)] + [("cached", k) for k in ks]:
        fn, attn = tasks[key]
        with decoder_attn(model, attn):
            out[key] = profile_call(fn, device).summary()
    return out
