"""Load benchmark of ``refrag serve``: N concurrent OpenAI clients streaming chat completions
whose messages carry retrieved-style ``<doc>`` passages (real Wikipedia text).

Three servers over the same model object and the same requests, measured in one run:

- ``refrag``: passages compressed (k tokens per chunk embedding), requests batched;
- ``refrag-unbatched``: the same, ``max_batch=1`` (what batching buys);
- ``plain-tokens``: the decoder reads the passages as ordinary tokens, batched (what
  compression buys).

Each request has its own passages (so the chunk cache is cold: every chunk is encoded) and
generates exactly ``--max-tokens`` tokens (``ignore_eos``). Per server: p50/p99 time to the
first streamed token (client side), completion tokens per second over the whole run, and
failed requests. A warm-up request per server is not counted.

    python benchmarks/serve_load.py --clients 8 --requests 2 --passages 8 --out serve_load.json

Without ``--checkpoint`` it takes the newest ``sft`` (else ``cpt``) folder under
``results/checkpoints/``, or else assembles the embedded default models with a random
projector (timing only: the text is noise).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import openai
import torch
import transformers

from refrag.data.corpus import read_mediawiki_dump
from refrag.io.runtime import pick_device, quiet_transformers
from refrag.modeling.prompting import doc_tag
from refrag.retrieval import chunk_documents
from refrag.serve.api import ServeLimits
from refrag.serve.chunk_cache import ChunkEmbeddingCache
from refrag.serve.engine import BatchingEngine
from refrag.serve.inference import load_refrag
from refrag.serve.server import ChatService, running_server

MODES = {
    "refrag": {"batched": True, "compress": True},
    "refrag-unbatched": {"batched": False, "compress": True},
    "plain-tokens": {"batched": True, "compress": False},
}


def default_checkpoint() -> str | None:
    """The newest trained ``sft`` folder (a chat model), else the newest ``cpt`` one."""
    for stage in ("sft", "cpt"):  # results/checkpoints/{corpus}/{decoder}/{encoder}/k{k}/{stage}
        found = glob.glob(f"results/checkpoints/**/{stage}/config.json", recursive=True)
        if found:
            return str(Path(max(found, key=lambda p: Path(p).stat().st_mtime)).parent)
    return None


def passages(source: str, words: int, count: int) -> list[str]:
    dumps = sorted(glob.glob(str(Path(source) / "*.bz2")))
    if not dumps:
        raise SystemExit(f"serve_load: no *.bz2 dump in {source} (run the workflow's fetch_corpus)")
    out: list[str] = []
    for doc in read_mediawiki_dump(dumps[0]):
        out += [p.text for p in chunk_documents([doc], words=words) if len(p.text.split()) == words]
        if len(out) >= count:
            return out[:count]
    raise SystemExit(f"serve_load: only {len(out)} passages of {words} words in {dumps[0]}")


def requests(texts: list[str], total: int, per_request: int) -> list[str]:
    """``total`` user messages, each with its own ``per_request`` passages and a question."""
    out = []
    for r in range(total):
        docs = texts[r * per_request : (r + 1) * per_request]
        tags = "\n".join(doc_tag(t, f"p{r}-{i}") for i, t in enumerate(docs))
        out.append(f"{tags}\nQuestion: what are these passages about?")
    return out


def one_request(client: openai.OpenAI, model: str, content: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    tokens = prompt = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
            prompt = chunk.usage.prompt_tokens
    end = time.perf_counter()
    return {"ttft_s": (first or end) - start, "seconds": end - start, "tokens": tokens,
            "prompt_positions": prompt}  # fmt: skip


def run_mode(name, model, tok, contents, args) -> dict:
    mode = MODES[name]
    engine = BatchingEngine(
        model,
        tok,
        max_batch=args.clients if mode["batched"] else 1,
        batch_wait_s=args.batch_wait_ms / 1000,
        chunk_cache=ChunkEmbeddingCache(),
    )
    limits = ServeLimits(max_prompt_positions=1 << 20, max_documents=1 << 10)
    service = ChatService(
        engine, model_name="bench", limits=limits, compress_documents=mode["compress"]
    )
    results: list[dict] = []
    failures: list[str] = []
    lock = threading.Lock()
    with running_server(service) as base_url:
        warm = openai.OpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=600)
        one_request(warm, "bench", contents[-1], 2)  # not counted (an extra request's text)
        stats_before = dict(vars(engine.stats))

        def client_loop(c: int) -> None:
            client = openai.OpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=600)
            for r in range(args.requests):
                content = contents[c * args.requests + r]
                try:
                    res = one_request(client, "bench", content, args.max_tokens)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    results.append(res)

        start = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    stats = {k: v - stats_before.get(k, 0) for k, v in vars(engine.stats).items()}
    stats["max_batch_seen"] = engine.stats.max_batch_seen
    ttft = np.array([r["ttft_s"] for r in results]) * 1000
    tokens = sum(r["tokens"] for r in results)
    return {
        "mode": name,
        **mode,
        "requests": len(results) + len(failures),
        "failed": len(failures),
        "failures": failures[:5],
        "ttft_ms_p50": float(np.percentile(ttft, 50)) if len(ttft) else None,
        "ttft_ms_p99": float(np.percentile(ttft, 99)) if len(ttft) else None,
        "tokens_per_s": tokens / wall,
        "completion_tokens": tokens,
        "wall_s": wall,
        "prompt_positions_mean": statistics.mean(r["prompt_positions"] for r in results)
        if results
        else None,
        "engine": stats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: see the module docstring")
    parser.add_argument("--k", type=int, default=16, help="compression without a checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2, help="sequential requests per client")
    parser.add_argument("--passages", type=int, default=8, help="passages per request")
    parser.add_argument("--words", type=int, default=100, help="words per passage")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES)
    )
    parser.add_argument("--corpus", default="resources/corpus/enwiki-sample/source")
    parser.add_argument("--cache-dir", default="resources/models")
    parser.add_argument("--out", help="write the results as JSON here too")
    args = parser.parse_args()
    quiet_transformers()
    torch.manual_seed(0)
    device = pick_device(args.device)
    checkpoint = args.checkpoint or default_checkpoint()
    model, tok = load_refrag(
        checkpoint, compression=args.k, device=device, cache_dir=args.cache_dir
    )
    total = args.clients * args.requests + 1  # + the warm-up's
    texts = passages(args.corpus, args.words, total * args.passages)
    contents = requests(texts, total, args.passages)
    param = next(model.parameters())
    report = {
        "checkpoint": checkpoint or "none: embedded default models, random projector",
        "decoder": model.config.decoder.name_or_path or model.config.decoder.model_type,
        "encoder": model.config.encoder.name_or_path or model.config.encoder.model_type,
        "k": model.config.compression,
        "device": str(param.device),
        "dtype": str(param.dtype),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),  # other work on the machine skews timings
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "load": vars(args) | {"checkpoint": checkpoint},
        "results": [run_mode(m, model, tok, contents, args) for m in args.modes.split(",")],
        "load_average_at_end": os.getloadavg(),
    }
    print(
        f"{report['decoder']} + {report['encoder']}, k={report['k']}, {report['device']} "
        f"{report['dtype']}; {args.clients} clients x {args.requests} requests, "
        f"{args.passages} passages of {args.words} words, {args.max_tokens} tokens each; "
        f"load average {report['load_average_at_start'][0]:.1f} -> "
        f"{report['load_average_at_end'][0]:.1f} on {report['cpus']} CPUs"
    )
    print(f"{'mode':<18}{'positions':>10}{'TTFT p50 ms':>13}{'p99 ms':>10}{'tok/s':>9}"
          f"{'failed':>8}{'max batch':>11}")  # fmt: skip
    for r in report["results"]:
        print(
            f"{r['mode']:<18}{r['prompt_positions_mean'] or 0:>10.0f}{r['ttft_ms_p50'] or 0:>13.0f}"
            f"{r['ttft_ms_p99'] or 0:>10.0f}{r['tokens_per_s']:>9.1f}{r['failed']:>8}"
            f"{r['engine']['max_batch_seen']:>11}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
