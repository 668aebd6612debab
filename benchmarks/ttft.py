"""Time-to-first-token of REFRAG against the plain decoder, measured in one run.

For every context length s and compression k, batch 1, after warm-up, the median of several
runs of:

- baseline: the decoder prefills BOS + s context tokens + q question tokens;
- REFRAG cached: the s/k chunk embeddings come from a warm :class:`ChunkEmbeddingCache`
  (hashing and lookup included), the decoder prefills BOS + s/k + q positions;
- REFRAG recomputed: the encoder and projector run on the s/k chunk rows first.

Each run starts from token ids on the host and ends when the greedy first token is back on
the host. The decoder, its kernels (SDPA; bf16 on a GPU) and its dtype are the same for all
three. TTIT is the median decode step after each prefill; throughput is the resulting
tokens/s for ``--new-tokens`` tokens. Weights can be real (``--decoder``/``--encoder`` specs,
default: the embedded models) or random with a named shape (``--decoder-shape llama2-7b
--encoder-shape roberta-large``), so the paper's setting needs no download::

    python benchmarks/ttft.py --device cpu --contexts 2048 --k 8,16,32 --json ttft.json
    python benchmarks/ttft.py --device cuda --decoder-shape llama2-7b --encoder-shape roberta-large \\
        --contexts 2048,4096,8192,16384 --k 8,16,32 --cuda-graph --json ttft.json --plot ttft.png
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from refrag.chunk_cache import ChunkEmbeddingCache
from refrag.inference import decode_step, default_dtype, prefill, try_cuda_graph
from refrag.modeling import RefragConfig, RefragModel
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
    "refrag_cached_ms",
    "refrag_recomputed_ms",
    "speedup_cached",
    "speedup_recomputed",
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ttit_ms(model: RefragModel, first: Any, device: torch.device, steps: int) -> float:
    """Median decode-step time against the KV cache a prefill left (2 warm-up steps)."""
    token, times = first.next_token, []
    for i in range(steps + 2):
        sync(device)
        start = time.perf_counter()
        token = decode_step(model, token, first.cache).argmax(-1)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def analytic_limit(k: int, d: int, s: int) -> float:
    """The paper's TTFT acceleration limit k²(6d+s)/(6dk+s)."""
    return k * k * (6 * d + s) / (6 * d * k + s)


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
    """Prefill from host ids, eager or through a captured CUDA graph of the decoder."""

    def __init__(
        self,
        model: RefragModel,
        x: dict[str, torch.Tensor],
        device: torch.device,
        full: bool,
        graph: bool,
    ):
        self.model, self.x, self.device = model, x, device
        self.ids = x["full_ids"] if full else x["ids"]
        self.graph = try_cuda_graph(model.decoder, self.ids.shape[1]) if graph else None

    def to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def first_token(self, **chunks: torch.Tensor) -> int:
        """Greedy first token on the host (a sync), from the ids and optional chunk inputs."""
        if self.graph is None:
            return int(prefill(self.model, self.to(self.ids), **chunks).next_token[0])
        with torch.inference_mode():
            embeds = self.model.embed_inputs(self.to(self.ids), **chunks)
        return int(self.graph(embeds)[0])

    def cached(self, cache: ChunkEmbeddingCache) -> int:
        embeds = cache.encode(self.model, self.x["rows"], self.x["row_mask"])
        return self.first_token(chunk_mask=self.to(self.x["chunk_mask"]), chunk_embeds=embeds)

    def recomputed(self) -> int:
        with torch.inference_mode():
            embeds = self.model.encode_chunks(self.to(self.x["rows"]), self.to(self.x["row_mask"]))
        return self.first_token(chunk_mask=self.to(self.x["chunk_mask"]), chunk_embeds=embeds)


def timed_ms(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1000


def measure_context(
    model: RefragModel,
    s: int,
    ks: list[int],
    gen: torch.Generator,
    device: torch.device,
    args: argparse.Namespace,
    graph: bool,
) -> dict[int, dict[str, float]]:
    """Median TTFTs and TTITs (ms) for one context length, per k.

    The runs are interleaved (each repeat times the baseline once, then every k cached and
    recomputed) so that a machine that slows down mid-run skews no ratio.
    """
    xs = {k: make_inputs(model, s, k, args.question_tokens, gen) for k in ks}
    base = Prompt(model, xs[ks[0]], device, full=True, graph=graph)
    tasks: dict[tuple[str, int], Callable[[], Any]] = {("baseline", 0): base.first_token}
    for k in ks:
        prompt = Prompt(model, xs[k], device, full=False, graph=graph)
        cache = ChunkEmbeddingCache(max_entries=None)
        cache.encode(model, xs[k]["rows"], xs[k]["row_mask"])  # warm: these chunks were seen before
        tasks["cached", k] = functools.partial(prompt.cached, cache)
        tasks["recomputed", k] = prompt.recomputed
    for _ in range(args.warmup):
        for fn in tasks.values():
            fn()
    times: dict[tuple[str, int], list[float]] = {key: [] for key in tasks}
    for _ in range(args.repeats):
        for key, fn in tasks.items():
            times[key].append(timed_ms(fn, device))
    base_ttit = ttit_ms(
        model, prefill(model, base.to(xs[ks[0]]["full_ids"])), device, args.new_tokens
    )
    out = {}
    for k in ks:
        x = xs[k]
        embeds = model.encode_chunks(base.to(x["rows"]), base.to(x["row_mask"]))
        first = prefill(
            model, base.to(x["ids"]), chunk_mask=base.to(x["chunk_mask"]), chunk_embeds=embeds
        )
        out[k] = {
            "baseline": statistics.median(times["baseline", 0]),
            "cached": statistics.median(times["cached", k]),
            "recomputed": statistics.median(times["recomputed", k]),
            "baseline_ttit": base_ttit,
            "refrag_ttit": ttit_ms(model, first, device, args.new_tokens),
            "baseline_positions": xs[k]["full_ids"].shape[1],
            "refrag_positions": xs[k]["ids"].shape[1],
        }
    return out


def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else default_dtype(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args, device, dtype)
    if args.compile:
        model.decoder.forward = torch.compile(model.decoder.forward, dynamic=False)
    d = model.config.decoder.hidden_size
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
    rows: list[dict[str, Any]] = []
    cuda_graph = args.cuda_graph and device.type == "cuda"
    for s in tqdm(args.contexts, desc="ttft", unit="context", file=sys.stderr, disable=args.quiet):
        with torch.inference_mode():
            measured = measure_context(model, s, args.k, gen, device, args, cuda_graph)
        for k in args.k:
            m = measured[k]
            base_ms, cached_ms, recomputed_ms = m["baseline"], m["cached"], m["recomputed"]
            base_ttit, ref_ttit = m["baseline_ttit"], m["refrag_ttit"]
            n = args.new_tokens
            rows.append(
                {
                    "context": s,
                    "k": k,
                    "baseline_ms": round(base_ms, 3),
                    "refrag_cached_ms": round(cached_ms, 3),
                    "refrag_recomputed_ms": round(recomputed_ms, 3),
                    "speedup_cached": round(base_ms / cached_ms, 3),
                    "speedup_recomputed": round(base_ms / recomputed_ms, 3),
                    "analytic_limit": round(analytic_limit(k, d, s), 2),
                    "baseline_positions": m["baseline_positions"],
                    "refrag_positions": m["refrag_positions"],
                    "baseline_ttit_ms": round(base_ttit, 3),
                    "refrag_ttit_ms": round(ref_ttit, 3),
                    "baseline_tokens_per_s": round(n / ((base_ms + (n - 1) * base_ttit) / 1000), 2),
                    "refrag_tokens_per_s": round(n / ((cached_ms + (n - 1) * ref_ttit) / 1000), 2),
                    "new_tokens": n,
                    "device": torch.cuda.get_device_name(device)
                    if device.type == "cuda"
                    else "cpu",
                    "dtype": str(dtype).removeprefix("torch."),
                    "decoder": dec_name,
                    "encoder": enc_name,
                    "attn": args.attn,
                    "cuda_graph": bool(cuda_graph),
                    "compile": bool(args.compile),
                    "warmup": args.warmup,
                    "repeats": args.repeats,
                }
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "s",
        "k",
        "base ms",
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
            r["refrag_cached_ms"],
            r["refrag_recomputed_ms"],
            r["speedup_cached"],
            r["speedup_recomputed"],
            r["analytic_limit"],
            r["baseline_ttit_ms"],
            r["refrag_ttit_ms"],
        )
        lines.append(
            " | ".join(f"{c:>10.2f}" if isinstance(c, float) else f"{c:>10}" for c in cells)
        )
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
        ax.plot(s, [r["speedup_cached"] for r in sub], "o-", color=color, label=f"k={k} cached")
        ax.plot(
            s, [r["speedup_recomputed"] for r in sub], "s--", color=color, label=f"k={k} recomputed"
        )
        ax.plot(
            s, [r["analytic_limit"] for r in sub], ":", color=color, alpha=0.6, label=f"k={k} limit"
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length s (tokens)")
    ax.set_ylabel("TTFT speedup over the full decoder")
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
        "--attn", default="sdpa", help="attention implementation: sdpa, flash_attention_2, eager"
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
        "--cuda-graph", action="store_true", help="replay prefills as captured CUDA graphs (GPU)"
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
        f"TTFT, batch 1, median of {args.repeats} after {args.warmup} warm-up: decoder {r0['decoder']}, "
        f"encoder {r0['encoder']}, {r0['device']}, {r0['dtype']}, {args.attn}"
        f"{', CUDA graphs' if r0['cuda_graph'] else ''}{', compiled' if args.compile else ''}"
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
