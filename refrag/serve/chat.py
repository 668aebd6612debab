"""``refrag chat``: talk to a REFRAG checkpoint with ``<doc>``-tagged context.

Each turn renders the whole conversation (the decoder's chat template when it has one),
tokenizes it with the document-tag tokenizer, and generates with a KV cache while streaming
the text. Two caches make later turns cheap: chunk embeddings of documents already seen come
from a :class:`~refrag.serve.chunk_cache.ChunkEmbeddingCache`, and the decoder's KV cache of the
previous turn is kept for the longest prefix the new prompt shares with it, so a turn only
pays for its new positions. TTFT is printed after every turn.

Interactive commands: ``/doc PATH`` (attach a file to the next message), ``/reset``,
``/help``, ``/quit`` (or Ctrl-D). Non-interactive: ``--prompt TEXT`` (repeatable) or lines on
a non-terminal stdin, one turn each; ``--json`` prints one JSON object per turn on stdout and
nothing else there (notes and errors go to stderr).

The model's answers are kept in the history as data (doc tags escaped, see
:func:`~refrag.modeling.prompting.escape_doc_text`), never read as markup again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from transformers import DynamicCache

from refrag.io.integrity import IntegrityError, UnsafeFolderError
from refrag.io.models import ModelSpecError, resolve_model
from refrag.io.runtime import pick_device, quiet_transformers
from refrag.modeling import RefragModel
from refrag.modeling.prompting import doc_tag, escape_doc_text, render_chat
from refrag.modeling.tokenization import RefragTokenizer
from refrag.serve.chunk_cache import ChunkEmbeddingCache, row_hashes
from refrag.serve.inference import load_refrag, model_inputs, stream_generate

MAX_DOC_BYTES = 1_000_000
MAX_TEXT_CHARS = 1_000_000


class ChatInputError(ValueError):
    """An attachment or checkpoint the chat cannot use; its message is one line."""


def read_attachment(path: str | Path, max_bytes: int | None = MAX_DOC_BYTES) -> str:
    """A file's text, or :class:`ChatInputError` if it is missing, a folder, too large, empty,
    or not UTF-8 text."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ChatInputError(f"{path}: no such file")
    if not path.is_file():
        raise ChatInputError(f"{path}: not a file")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise ChatInputError(
            f"{path}: {size:,} bytes, over the {max_bytes:,}-byte limit (--max-doc-bytes)"
        )
    data = path.read_bytes()
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL")
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ChatInputError(f"{path}: not UTF-8 text (byte {err.start}: binary file?)") from None
    if not text.strip():
        raise ChatInputError(f"{path}: empty file")
    return text


def doc_markup(path: str | Path, max_bytes: int | None = MAX_DOC_BYTES) -> tuple[str, int]:
    """A file as a ``<doc>`` whose id is the file name (:func:`doc_tag`); and the number of
    doc tags escaped in it."""
    path = Path(path)
    text = read_attachment(path, max_bytes)
    return doc_tag(text, path.name), escape_doc_text(text)[1]


def check_checkpoint(checkpoint: str, cache_dir: str | Path) -> Path:
    """A local checkpoint folder (never looked up on the hub), or ``hf:<repo>`` fetched into
    ``cache_dir``; its integrity is checked by the load."""
    if checkpoint.startswith("hf:"):
        return resolve_model(checkpoint, cache_dir)
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise ChatInputError(
            f"--checkpoint {checkpoint}: no such folder (a path is never looked up on the hub; "
            "write hf:<repo> for a hub checkpoint)"
        )
    return path


@dataclass
class TurnStats:
    """What one turn cost."""

    ttft_ms: float
    new_tokens: int
    seconds: float
    decode_tokens_per_s: float
    positions: int  # decoder positions of the prompt
    reused_positions: int  # of those, read from the previous turn's KV cache
    chunks: int  # chunk embeddings in the prompt

    def line(self) -> str:
        return (
            f"[TTFT {self.ttft_ms:.1f} ms | {self.new_tokens} tokens in {self.seconds:.2f} s, "
            f"{self.decode_tokens_per_s:.1f} tok/s after the first | prompt {self.positions} "
            f"positions ({self.chunks} chunk embeddings, {self.reused_positions} reused from the KV cache)]"
        )


class ChatSession:
    """Multi-turn chat over a :class:`RefragModel` with streamed, KV-cached generation."""

    def __init__(
        self,
        model: RefragModel,
        tokenizer: RefragTokenizer,
        *,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        chunk_cache: ChunkEmbeddingCache | None = None,
    ):
        self.model, self.tok = model, tokenizer
        self.template = getattr(tokenizer.decoder_tokenizer, "chat_template", None)
        if self.template:
            tokenizer.add_bos = False  # the chat template opens the sequence itself
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.chunk_cache = chunk_cache if chunk_cache is not None else ChunkEmbeddingCache()
        model.use_chunk_cache(self.chunk_cache)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the chunk cache stays)."""
        self.messages: list[dict[str, str]] = (
            [] if not self.system else [{"role": "system", "content": self.system}]
        )
        self._kv: DynamicCache | None = None
        self._kv_keys: list = []

    def warm_up(self) -> None:
        """One short generation so that the first turn's TTFT is not a cold start."""
        batch = model_inputs(self.tok("<doc id='warm-up'>warm up</doc> Hi"), self.model.device)
        self.model.generate(
            **batch, max_new_tokens=2, do_sample=False, pad_token_id=self.tok.decoder_pad_token_id
        )

    def render(self, messages: list[dict[str, str]]) -> str:
        """The conversation as one text, ready for the assistant's next message."""
        return render_chat(self.tok.decoder_tokenizer, messages)

    def turn(self, user_text: str, stream: TextIO | None = None) -> tuple[str, TurnStats]:
        """Answer ``user_text`` (may hold ``<doc>`` tags), writing text to ``stream`` as it comes.

        Raises :class:`~refrag.modeling.tokenization.DocMarkupError` for bad markup (or any error of
        the tokenizer or the model); the history is then unchanged and the session usable.
        """
        try:
            return self._turn(user_text, stream)
        except BaseException:
            self._kv, self._kv_keys = None, []  # the KV cache may hold a half-done turn
            raise

    def _turn(self, user_text: str, stream: TextIO | None) -> tuple[str, TurnStats]:
        messages = [*self.messages, {"role": "user", "content": user_text}]
        batch = self.tok(self.render(messages))
        keys = self._position_keys(batch)
        reuse = self._reusable_prefix(keys)
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kwargs["temperature"] = self.temperature
        if reuse:
            extra = self._kv.get_seq_length() - reuse
            if extra > 0:
                self._kv.crop(-extra)  # keep the first `reuse` positions
            kwargs["cache"] = self._kv
        else:
            self._kv = kwargs["cache"] = DynamicCache(config=self.model.config.decoder)
        started = time.perf_counter()
        run = stream_generate(self.model, self.tok, batch, **kwargs)
        pieces = []
        for piece in run.pieces:
            pieces.append(piece)
            if stream is not None:
                stream.write(piece)
                stream.flush()
        seconds = time.perf_counter() - started
        answer = "".join(pieces).strip()
        self._kv_keys = (keys + run.token_ids)[: self._kv.get_seq_length()]
        # the answer is data: kept escaped, so a `</doc>` the model wrote is never markup later
        kept = escape_doc_text(answer)[0]
        self.messages = [*messages, {"role": "assistant", "content": kept}]
        stats = TurnStats(
            ttft_ms=run.ttft_s * 1000,
            new_tokens=len(run.token_ids),
            seconds=seconds,
            decode_tokens_per_s=run.decode_tokens_per_s,
            positions=len(keys),
            reused_positions=reuse,
            chunks=int(batch["chunk_mask"].sum()),
        )
        return answer, stats

    def _position_keys(self, batch) -> list:
        """One hashable per decoder position: the token id, or the chunk row's hash."""
        ids = batch["input_ids"][0].tolist()
        hashes = row_hashes(
            batch["chunk_input_ids"].numpy(), batch["chunk_attention_mask"].numpy()
        ).tolist()
        chunk_positions = batch["chunk_mask"][0].nonzero().squeeze(1).tolist()
        for pos, h in zip(chunk_positions, hashes):
            ids[pos] = ("chunk", *h)
        return ids

    def _reusable_prefix(self, keys: list) -> int:
        if self._kv is None:
            return 0
        n = 0
        for a, b in zip(self._kv_keys, keys):
            if a != b:
                break
            n += 1
        return min(n, len(keys) - 1)  # at least one position must be read to get logits


def text_cap(args: argparse.Namespace, max_doc_bytes: int | None) -> int | None:
    """The tokenizer's cap on one prompt's characters: ``--max-text-chars``, else 1,000,000 or
    ``--max-doc-bytes`` when that is larger (a raised attachment cap raises it too); 0: none."""
    chars = getattr(args, "max_text_chars", None)
    if chars is None:
        chars = max(MAX_TEXT_CHARS, max_doc_bytes or 0)
    return chars or None


HELP = "commands: /doc PATH (attach a file to your next message), /reset, /help, /quit"


def attach(path: str, max_bytes: int | None, stdout: TextIO | None) -> str:
    """Read an attachment as a ``<doc>``, saying (on ``stdout``) what was attached."""
    markup, escaped = doc_markup(path, max_bytes)
    if stdout is not None:
        note = (
            f"; {escaped} doc tag(s) in it escaped as &lt;doc (a file is data)" if escaped else ""
        )
        print(f"(attached {path}{note})", file=stdout, flush=True)
    return markup


def run(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Entry point of ``refrag chat``."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    quiet_transformers()
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    max_bytes = getattr(args, "max_doc_bytes", MAX_DOC_BYTES)
    cache_dir = getattr(args, "cache_dir", "resources/models")
    try:
        pending_docs = [attach(p, max_bytes, None) for p in args.doc]
        checkpoint = args.checkpoint and check_checkpoint(args.checkpoint, cache_dir)
        model, tok = load_refrag(
            checkpoint or None,
            decoder=args.decoder,
            encoder=args.encoder,
            compression=args.k,
            device=device,
            cache_dir=cache_dir,
        )
        tok.max_text_chars = text_cap(args, max_bytes)
        tok.max_chunk_rows = getattr(args, "max_chunk_rows", tok.max_chunk_rows) or None
    except (ChatInputError, IntegrityError, UnsafeFolderError, ModelSpecError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"refrag chat: {first}", file=sys.stderr, flush=True)
        return 2
    session = ChatSession(
        model,
        tok,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        chunk_cache=ChunkEmbeddingCache(disk_dir=args.chunk_cache_dir),
    )
    session.warm_up()
    interactive = not args.prompt and stdin.isatty() and not args.json
    notes = sys.stderr if args.json else stdout  # --json: stdout carries JSON only
    turns = iter(args.prompt) if args.prompt else None
    if interactive:
        where = args.checkpoint or f"{args.decoder} + {args.encoder} (untrained projector)"
        print(
            f"refrag chat: {where} on {device}, k={tok.compression}. {HELP}",
            file=stdout,
            flush=True,
        )
    status = 0
    try:
        while True:
            if turns is not None:
                line = next(turns, None)
            else:
                if interactive:
                    stdout.write("you> ")
                    stdout.flush()
                line = stdin.readline()
                line = None if line == "" else line.rstrip("\n")
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                cmd, _, rest = line.partition(" ")
                if cmd in ("/quit", "/exit"):
                    break
                if cmd == "/reset":
                    session.reset()
                    print("(conversation cleared)", file=notes, flush=True)
                elif cmd == "/doc" and rest.strip():
                    try:
                        pending_docs.append(attach(rest.strip(), max_bytes, notes))
                    except (ChatInputError, OSError) as exc:
                        print(f"error: {exc}", file=notes, flush=True)
                else:
                    print(HELP, file=notes, flush=True)
                continue
            text = "\n".join([*pending_docs, line])
            if interactive:
                stdout.write("refrag> ")
            try:
                answer, stats = session.turn(text, stream=None if args.json else stdout)
            except Exception as exc:  # noqa: BLE001 - a failed turn must not end the session
                dropped = f" ({len(pending_docs)} attached file(s) dropped)" if pending_docs else ""
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                print(
                    f"error: {first}{dropped}",
                    file=stdout if interactive else sys.stderr,
                    flush=True,
                )
                pending_docs, status = [], 1
                continue
            pending_docs = []
            if args.json:
                print(
                    json.dumps({"prompt": line, "answer": answer, **vars(stats)}),
                    file=stdout,
                    flush=True,
                )
            else:
                stdout.write("\n")
                print(stats.line(), file=stdout if interactive else sys.stderr, flush=True)
    finally:
        session.chunk_cache.close()  # checkpoints the disk tier's WAL into its file
    return status
