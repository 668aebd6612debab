"""REFRAG on vLLM (prompt embeddings) against plain vLLM on the same prompts: see
:mod:`refrag.bench.vllm_compare`. Needs a CUDA machine and ``pip install .[vllm]``; random
weights of named shapes, nothing downloaded::

    python benchmarks/vllm_refrag.py --decoder-shape llama2-7b --encoder-shape roberta-large \\
        --contexts 4096,16384 --k 16,32 --prompts 8 --json results/bench/vllm_refrag.json
"""

import argparse
import json
from pathlib import Path

from refrag.bench.shapes import DECODER_SHAPES, ENCODER_SHAPES
from refrag.io.models import DEFAULT_CACHE_DIR, DEFAULT_DECODER, DEFAULT_ENCODER


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--decoder-shape", default="llama2-7b", help=", ".join(DECODER_SHAPES))
    p.add_argument("--encoder-shape", default="roberta-large", help=", ".join(ENCODER_SHAPES))
    p.add_argument("--decoder", default=DEFAULT_DECODER, help="decoder spec when no shape")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, help="encoder spec when no shape")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    p.add_argument("--attn", default="sdpa", help="the HF encoder's attention implementation")
    p.add_argument("--contexts", type=ints, default=[4096, 16384])
    p.add_argument("--k", type=ints, default=[16, 32])
    p.add_argument("--prompts", type=int, default=8, help="timed prompts per (s, k)")
    p.add_argument("--question-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs")
    p.add_argument("--decoder-dir", type=Path, help="export the decoder here (default: a temp dir)")
    p.add_argument("--json", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if any(s % k for s in args.contexts for k in args.k):
        p.error("every context length must be a multiple of every k")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    from refrag.bench.vllm_compare import format_rows, run  # imports vLLM (optional extra)

    args = parse_args(argv)
    rows = run(args)
    env = rows[0]["environment"]
    print("ran on: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(
        f"TTFT per request (batch 1, median of {args.prompts} new prompts), TTIT per token,"
        f" throughput of {args.prompts} prompts in one call; agree = REFRAG-on-vLLM first"
        " tokens equal to the HF REFRAG prefill's"
    )
    print(format_rows(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
