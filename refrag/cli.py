"""``refrag`` command line: fetch models, the library demo, chat, one training stage, the
distributed check. The library raises exceptions with one-line messages; this module alone
turns them into exit codes (:func:`one_line_errors` in the workflow's scripts too)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from refrag.data.alignment import align
from refrag.io.integrity import DiskFullError, IntegrityError, UnsafeFolderError
from refrag.io.models import (
    DEFAULT_CACHE_DIR,
    DEFAULT_DECODER,
    DEFAULT_ENCODER,
    ModelSpecError,
    check_specs,
    resolve_model,
)
from refrag.io.runtime import log_to, pick_device, quiet_transformers
from refrag.modeling import RefragModel
from refrag.modeling.tokenization import RefragTokenizer
from refrag.preflight import ConfigFileError, check_config_files, configfile_args
from refrag.retrieval import PassageIndex
from refrag.serve.api import ServeLimits
from refrag.serve.chat import ChatInputError, check_checkpoint, run
from refrag.serve.chunk_cache import ChunkEmbeddingCache
from refrag.serve.engine import BatchingEngine
from refrag.serve.inference import load_refrag
from refrag.serve.server import ChatService, serve_http
from refrag.train import batch
from refrag.train.distributed import hello, rank_log_path
from refrag.train.launch import ParallelError
from refrag.train.runner import read_baselines, train_stage
from refrag.train.stages import STAGES

DEMO_TEXT = (
    "Answer from the document.\n"
    "<doc id='ada'>Ada Lovelace was an English mathematician and writer, chiefly known for her "
    "work on Charles Babbage's proposed mechanical general-purpose computer, the Analytical "
    "Engine. She was the first to recognise that the machine had applications beyond pure "
    "calculation.</doc>\n"
    "Question: Whose machine did Ada Lovelace write about?\nAnswer:"
)


@contextlib.contextmanager
def one_line_errors(rules: Mapping[str | os.PathLike | None, str] | None = None) -> Iterator[None]:
    """Turn an :class:`IntegrityError` (or :class:`UnsafeFolderError`, :class:`DiskFullError`)
    into ``SystemExit`` with its one line (no traceback).

    ``rules`` maps the input paths of the calling step to the step that writes each; an error
    without a rule hint gets the one whose path contains the damaged file.
    """
    try:
        yield
    except (UnsafeFolderError, DiskFullError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(f"error: {err}") from None
    except IntegrityError as err:
        if err.rule is None:
            for where, rule in (rules or {}).items():
                if where is not None and _inside(err.path, Path(where)):
                    err.rule = rule
                    break
        print(f"error: {err}", file=sys.stderr, flush=True)  # into the step's log, if redirected
        raise SystemExit(f"error: {err}") from None


def _inside(path: Path, where: Path) -> bool:
    path, where = path.absolute(), where.absolute()
    return path == where or where in path.parents


def exit_on_config_file_errors(argv: list[str], defaults: tuple[str, ...] = ()) -> None:
    """Exit with ``config: file:line:column: message`` when a config file of a Snakemake
    command line (``--configfile``), or one of ``defaults``, is not valid YAML/JSON (Snakemake
    itself names neither the file nor the line); a missing default is Snakemake's to report."""
    try:
        check_config_files([*(d for d in defaults if Path(d).is_file()), *configfile_args(argv)])
    except ConfigFileError as err:
        raise SystemExit(f"config: {err}") from None


def fetch_models(args: argparse.Namespace) -> None:
    specs = args.specs or [DEFAULT_DECODER, DEFAULT_ENCODER]
    check_specs(specs, args.cache_dir)  # all named before any is fetched
    for spec in specs:
        print(f"{spec} -> {resolve_model(spec, args.cache_dir)}", flush=True)


def demo(args: argparse.Namespace) -> None:
    """Tokenize a text with a <doc>, align the tokenizers, run forward and generate."""
    quiet_transformers()
    torch.manual_seed(0)
    check_specs([args.encoder, args.decoder], args.cache_dir)
    enc_dir, dec_dir = (
        resolve_model(args.encoder, args.cache_dir),
        resolve_model(args.decoder, args.cache_dir),
    )
    pair = {"encoder_name_or_path": str(enc_dir), "decoder_name_or_path": str(dec_dir)}
    model = RefragModel.from_encoder_decoder_pretrained(**pair, compression=args.k)
    tok = RefragTokenizer.from_encoder_decoder_pretrained(**pair, compression=args.k)
    segments = tok.parse_and_tokenize(DEMO_TEXT)
    print(f"decoder {dec_dir.name}, encoder {enc_dir.name}, k={args.k}")
    for seg in segments:
        what = (
            f"doc {seg['meta']['id']}: {len(seg.tokens)} encoder tokens -> {seg.num_chunks} chunks"
            if seg.type == "encoder"
            else f"{len(seg.tokens)} decoder tokens"
        )
        print(f"  {seg.type:<7} {what}")
    doc = next(s for s in segments if s.type == "encoder").raw_text
    pairs = align(
        doc, encoder_tokenizer=tok.encoder_tokenizer, decoder_tokenizer=tok.decoder_tokenizer
    ).pairs
    print(f"token alignment of the document: {len(pairs)} aligned prefix pairs, first {pairs[:4]}")
    batch = tok(DEMO_TEXT, padding_side="left")
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(**batch)
        fwd = time.perf_counter() - t0
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        new = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(
        f"forward: {batch['input_ids'].shape[1]} decoder positions instead of "
        f"{batch['input_ids'].shape[1] - int(batch['chunk_mask'].sum()) + sum(len(s.tokens) for s in segments if s.type == 'encoder')}, "
        f"loss {out.loss.item():.3f}, {fwd * 1000:.0f} ms"
    )
    print(
        f"generated (untrained projector, so expect noise): {tok.decode(new[0], skip_special_tokens=True)!r}"
    )


def chat(args: argparse.Namespace) -> int:
    return run(args)


def chat_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``refrag chat`` options."""
    parser.add_argument(
        "--checkpoint",
        help="a RefragModel folder, or hf:<repo> (default: assemble --decoder/--encoder, "
        "random projector)",
    )
    parser.add_argument(
        "--decoder", default=DEFAULT_DECODER, help="decoder spec when no checkpoint is given"
    )
    parser.add_argument(
        "--encoder", default=DEFAULT_ENCODER, help="encoder spec when no checkpoint is given"
    )
    parser.add_argument("--k", type=int, default=16, help="compression when no checkpoint is given")
    parser.add_argument(
        "--doc",
        action="append",
        default=[],
        metavar="PATH",
        help="a file given as context (repeatable)",
    )
    parser.add_argument(
        "--prompt", action="append", default=[], help="run these turns and exit (repeatable)"
    )
    parser.add_argument("--system", help="system message")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    parser.add_argument(
        "--chunk-cache-dir", help="keep chunk embeddings on disk here across sessions"
    )
    parser.add_argument(
        "--max-doc-bytes",
        type=int,
        default=1_000_000,
        help="refuse attachments larger than this (default 1 MB)",
    )
    parser.add_argument(
        "--max-text-chars",
        type=int,
        help="refuse a prompt (history, attachments and message) longer than this many "
        "characters (default 1,000,000, or --max-doc-bytes when larger; 0: no cap)",
    )
    parser.add_argument(
        "--max-chunk-rows",
        type=int,
        default=16_384,
        help="refuse a prompt whose documents make more chunk rows than this (default 16,384; 0: no cap)",
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per turn on stdout (non-interactive)"
    )
    parser.add_argument("--seed", type=int, default=0)


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``refrag serve`` options."""
    parser.add_argument(
        "--checkpoint",
        help="a RefragModel folder, or hf:<repo> (default: assemble --decoder/--encoder, "
        "random projector)",
    )
    parser.add_argument("--decoder", default=DEFAULT_DECODER, help="without --checkpoint")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help="without --checkpoint")
    parser.add_argument("--k", type=int, default=16, help="compression without --checkpoint")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    parser.add_argument("--model-name", help="the model id clients name (default: the folder)")
    parser.add_argument(
        "--index", metavar="FOLDER", help="a passage index; requests may then ask `retrieve: n`"
    )
    parser.add_argument(
        "--index-encoder",
        metavar="FOLDER",
        help="the index's sentence encoder (default: the folder that built it)",
    )
    parser.add_argument("--max-batch", type=int, default=8, help="requests per batch (1: off)")
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch's first request waits for others",
    )
    parser.add_argument(
        "--plain-documents",
        action="store_true",
        help="read <doc> passages as decoder tokens, uncompressed (the baseline)",
    )
    parser.add_argument("--chunk-cache-dir", help="keep chunk embeddings on disk here too")
    parser.add_argument("--max-tokens", type=int, default=256, help="when a request says none")
    parser.add_argument("--grace-s", type=float, default=60, help="drain time after SIGTERM")
    limits = ServeLimits()
    for name, value in vars(limits).items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=value, help=f"(default {value:,})"
        )


def serve(args: argparse.Namespace) -> None:
    """Load the index (first: a bad one fails fast) and the model, then serve until
    SIGTERM/SIGINT."""
    quiet_transformers()
    try:
        checkpoint = args.checkpoint and check_checkpoint(args.checkpoint, args.cache_dir)
    except ChatInputError as err:
        raise SystemExit(f"refrag serve: {err}") from None
    device = pick_device(args.device)
    index = load_index(args.index, args.index_encoder, device) if args.index else None
    model, tok = load_refrag(
        checkpoint or None,
        decoder=args.decoder,
        encoder=args.encoder,
        compression=args.k,
        device=device,
        cache_dir=args.cache_dir,
    )
    limits = ServeLimits(**{name: getattr(args, name) for name in vars(ServeLimits())})
    engine = BatchingEngine(
        model,
        tok,
        max_batch=args.max_batch,
        batch_wait_s=args.batch_wait_ms / 1000,
        chunk_cache=ChunkEmbeddingCache(disk_dir=args.chunk_cache_dir),
    )
    name = args.model_name or (Path(checkpoint).name if checkpoint else f"refrag-k{args.k}")
    service = ChatService(
        engine,
        model_name=name,
        limits=limits,
        retriever=index,
        compress_documents=not args.plain_documents,
        default_max_tokens=args.max_tokens,
    )
    print(
        f"refrag serve: {name} on {device}, k={tok.compression}, http://{args.host}:{args.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    serve_http(service, host=args.host, port=args.port, grace_s=args.grace_s)


def load_index(folder: str, encoder: str | None, device: str) -> PassageIndex:
    """The passage index behind ``refrag serve --index`` (its query encoder on ``device``)."""
    try:
        return PassageIndex.load(folder, encoder, device=device)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"refrag serve: --index {folder}: {err}") from None


def train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=list(STAGES), required=True)
    parser.add_argument("--k", type=int, required=True, help="compression rate")
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", help="the previous stage's folder")
    start.add_argument("--encoder", help="base encoder folder (with --decoder)")
    parser.add_argument("--decoder", help="base decoder folder (with --encoder)")
    parser.add_argument(
        "--data", required=True, help="what the stage reads: alignment cache or train shards"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--heldout", help="validation shard folder: log the held-out curve every eval_steps"
    )
    parser.add_argument(
        "--heldout-baselines",
        help="the validation set's baselines JSON (refrag.eval.perplexity rows) for the curve",
    )
    parser.add_argument(
        "--hp", default="{}", help="overrides of the stage's defaults, as JSON (StageConfig)"
    )
    parser.add_argument(
        "--parallel",
        default="{}",
        help="the run's parallel settings, as JSON (refrag.train.launch.Parallel: strategy …)",
    )
    parser.add_argument(
        "--rebuilt-by",
        default="{}",
        help="JSON {input path: the step that writes it}, named by a damaged input's error",
    )
    parser.add_argument(
        "--rank-log-dir", help="under torchrun, each rank writes DIR/run-{RANK}.log"
    )


def train(args: argparse.Namespace) -> None:
    """One stage of the registry, inline or under torchrun (one log per rank)."""
    if (args.encoder is None) != (args.decoder is None):
        raise SystemExit("refrag train: --encoder and --decoder go together")
    # the Trainer joins torchrun's process group itself (NCCL on GPUs, gloo on CPU)
    per_rank = args.rank_log_dir and int(os.environ.get("WORLD_SIZE", "1")) > 1
    with (
        log_to(rank_log_path(args.rank_log_dir) if per_rank else None),
        one_line_errors(json.loads(args.rebuilt_by)),
    ):
        metrics = train_stage(
            args.stage,
            init=args.init,
            encoder=args.encoder,
            decoder=args.decoder,
            data=args.data,
            heldout=args.heldout,
            heldout_baselines=args.heldout_baselines and read_baselines(args.heldout_baselines),
            out=args.out,
            compression=args.k,
            hp=json.loads(args.hp),
            parallel=json.loads(args.parallel),
        )
        print(json.dumps(metrics))


def hello_dist(args: argparse.Namespace) -> None:
    """The seed's minimal distributed app (under torchrun): all_reduce, one log per rank."""
    with log_to(rank_log_path(args.rank_log_dir)):
        hello(args.out)


DEFAULT_INDEX = "results/index/enwiki-sample/all-minilm-l6-v2"  # the main job's build_index


def retrieve(args: argparse.Namespace) -> None:
    """The top passages of the index for a question, best first."""
    quiet_transformers()
    try:
        index = PassageIndex.load(args.index, args.encoder)
        hits = index.search(args.question, args.n)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"refrag retrieve: {err}") from None
    if args.json:
        print(json.dumps([vars(p) | {"score": round(p.score, 4)} for p in hits]))
        return
    for rank, p in enumerate(hits, 1):
        title = f" ({p.title})" if p.title else ""
        print(f"[{rank}] {p.score:.3f} {p.passage_id}{title}\n{p.text}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="refrag", description=__doc__)
    parser.add_argument(
        "--cache-dir", default=str(DEFAULT_CACHE_DIR), help="where resolved models are kept"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "fetch-models", help="resolve model specs to local folders (default: the embedded models)"
    )
    p.add_argument("specs", nargs="*", help="hf:<repo>, embedded:<name> or a folder")
    p.set_defaults(func=fetch_models)
    p = sub.add_parser(
        "demo", help="tokenize, align, run forward and generate on the default models"
    )
    p.add_argument("--decoder", default=DEFAULT_DECODER)
    p.add_argument("--encoder", default=DEFAULT_ENCODER)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.set_defaults(func=demo)
    p = sub.add_parser(
        "chat", help="chat with a REFRAG model: <doc> context, streamed tokens, TTFT per turn"
    )
    chat_arguments(p)
    p.set_defaults(func=chat)
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions) for a checkpoint"
    )
    serve_arguments(p)
    p.set_defaults(func=serve)
    p = sub.add_parser(
        "train", help="train one stage of the registry (what the workflow's train jobs run)"
    )
    train_arguments(p)
    p.set_defaults(func=train)
    p = sub.add_parser("hello-dist", help="minimal distributed check (run it under torchrun)")
    p.add_argument("--out", required=True)
    p.add_argument("--rank-log-dir", required=True)
    p.set_defaults(func=hello_dist)
    p = sub.add_parser(
        "batch-multinode",
        help="submit an AWS Batch multi-node parallel job running a command on every node, wait",
    )
    batch.add_arguments(p)
    p.set_defaults(func=lambda args: batch.run_from_arguments(args) and None)
    p = sub.add_parser("retrieve", help="the passages of a vector index nearest a question")
    p.add_argument("question")
    p.add_argument(
        "--index",
        default=DEFAULT_INDEX,
        help=f"an index folder written by the build_index rule (default {DEFAULT_INDEX})",
    )
    p.add_argument("-n", type=int, default=5, help="passages to print (default 5)")
    p.add_argument("--encoder", help="the encoder folder, if not where the index was built")
    p.add_argument("--json", action="store_true", help="one JSON list of passages on stdout")
    p.set_defaults(func=retrieve)
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except (
        ModelSpecError,
        IntegrityError,
        UnsafeFolderError,
        DiskFullError,
        ParallelError,
        batch.BatchJobError,
    ) as err:  # one line
        raise SystemExit(f"refrag {args.command}: {err}") from None
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
