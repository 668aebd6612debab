"""ATen ops per REFRAG prefill, per decoder layer and around the layers, counted with
torch.profiler on the CPU (the counts per layer do not depend on the widths or the chunk
count), extrapolated to a full-depth decoder::

    python benchmarks/prefill_ops.py --layers 2,4 --full-layers 32 --contexts 512,1024 --k 8,16,32
"""

import argparse

import torch

from refrag.bench.profile import profile_call
from refrag.bench.shapes import build_model
from refrag.bench.timing import make_inputs
from refrag.serve.chunk_cache import ChunkEmbeddingCache
from refrag.serve.inference import StaticRunner, prefill


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def counts(model, x) -> dict[str, dict]:
    """Op profile summaries of one cached, recomputed and static-runner (eager) prefill."""
    cache = ChunkEmbeddingCache(max_entries=None)
    cache.encode(model, x["rows"], x["row_mask"])
    positions = x["chunk_mask"][0].nonzero().view(-1)
    runner = StaticRunner(model, x["ids"].shape[1], chunk_positions=positions, max_new_tokens=4)
    rows = {"chunk_input_ids": x["rows"], "chunk_attention_mask": x["row_mask"]}
    calls = {
        "cached": lambda: prefill(
            model,
            x["ids"],
            chunk_mask=x["chunk_mask"],
            chunk_embeds=cache.encode(model, x["rows"], x["row_mask"]),
        ),
        "recomputed": lambda: prefill(model, x["ids"], chunk_mask=x["chunk_mask"], **rows),
        "runner": lambda: runner.prefill(x["ids"], cache.encode(model, x["rows"], x["row_mask"])),
    }
    with torch.inference_mode():
        return {name: profile_call(fn).summary() for name, fn in calls.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decoder-shape", default="llama2-7b")
    p.add_argument("--encoder-shape", default="roberta-large")
    p.add_argument("--layers", type=ints, default=[2, 4], help="two decoder/encoder depths")
    p.add_argument("--full-layers", type=int, default=32, help="depth to extrapolate to")
    p.add_argument("--contexts", type=ints, default=[512, 1024])
    p.add_argument("--k", type=ints, default=[8, 16, 32])
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    torch.set_num_threads(1)
    found = {}
    for n in args.layers:
        shapes = argparse.Namespace(
            decoder_shape=f"{args.decoder_shape}:num_hidden_layers={n},vocab_size=4096",
            encoder_shape=f"{args.encoder_shape}:num_hidden_layers={n}",
            attn="sdpa",
            contexts=args.contexts,
            question_tokens=16,
            new_tokens=4,
            k=args.k,
        )
        model = build_model(shapes, torch.device("cpu"), getattr(torch, args.dtype))
        gen = torch.Generator().manual_seed(0)
        for s in args.contexts:
            for k in args.k:
                for name, c in counts(model, make_inputs(model, s, k, 16, gen)).items():
                    found[n, s, k, name] = c
                    print(
                        f"layers={n} s={s} k={k} chunks={s // k} {name}: {c['aten_ops']} ATen ops,"
                        f" {c['aten_compute_ops']} not views, {c['cat_ops']} cat"
                    )
    lo, hi = args.layers[:2]
    s, k = args.contexts[0], args.k[0]
    for name in ("cached", "recomputed", "runner"):
        for key in ("aten_ops", "aten_compute_ops", "cat_ops"):
            a, b = found[lo, s, k, name][key], found[hi, s, k, name][key]
            per_layer = (b - a) / (hi - lo)
            fixed = a - per_layer * lo
            print(
                f"{name} {key}: {per_layer:g} per layer (decoder + encoder), {fixed:g} around;"
                f" {args.full_layers} layers: {fixed + per_layer * args.full_layers:g}"
            )


if __name__ == "__main__":
    main()
