"""``refrag`` command line: fetch models, run the library demo."""

from __future__ import annotations

import argparse
import time

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
from refrag.io.runtime import quiet_transformers
from refrag.modeling import RefragModel
from refrag.modeling.tokenization import RefragTokenizer
from refrag.serve.chat import run

DEMO_TEXT = (
    "Answer from the document.\n"
    "<doc id='ada'>Ada Lovelace was an English mathematician and writer, chiefly known for her "
    "work on Charles Babbage's proposed mechanical general-purpose computer, the Analytical "
    "Engine. She was the first to recognise that the machine had applications beyond pure "
    "calculation.</doc>\n"
    "Question: Whose machine did Ada Lovelace write about?\nAnswer:"
)


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
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except (ModelSpecError, IntegrityError, UnsafeFolderError, DiskFullError) as err:  # one line
        raise SystemExit(f"refrag {args.command}: {err}") from None
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
