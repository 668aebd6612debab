"""``refrag serve``: an OpenAI-compatible HTTP server for a REFRAG checkpoint.

Endpoints: ``POST /v1/chat/completions`` (``stream: true`` sends OpenAI's
``chat.completion.chunk`` events over SSE, ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health``. Messages carry passages as ``<doc id='…'>…</doc>`` in their content (the
markup of ``refrag chat`` and :mod:`refrag.modeling.prompting`); the encoder reads them
compressed. With an index, the extra body field ``retrieve: n`` asks the server to prepend
the top-n passages for the last user message. Other extra fields: ``ignore_eos`` (generate
``max_tokens`` tokens). ``temperature`` defaults to 0 (greedy) here.

Every request goes through one :class:`~refrag.serve.engine.BatchingEngine`: requests that
arrive together share forward passes, and the chunk-embedding cache is shared by all.
Requests over the limits (:class:`ServeLimits`) get a 4xx answer in OpenAI's error format
(``{"error": {"message", "type", "param", "code"}}``). On SIGTERM/SIGINT the server stops
listening, answers requests on open connections with 503, finishes the ones in flight, then
exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from refrag.modeling.prompting import doc_tag, render_chat, template_tokenizer
from refrag.modeling.tokenization import DocMarkupError, InvalidTextError, TextTooLargeError
from refrag.serve.api import (
    ApiError,
    ChatRequest,
    Retriever,
    ServeLimits,
    message_role,
    message_text,
)
from refrag.serve.engine import BatchingEngine, EngineClosedError, GenerationRequest, TokenEvent


@dataclass
class Prepared:
    """A request turned into what the engine reads, and what the answer reports."""

    encoded: dict[str, list]
    max_new_tokens: int
    prompt_positions: int
    chunks: int
    documents: int
    retrieved: list[str]


@dataclass
class Generation:
    """A submitted request: iterate :meth:`pieces` for its text as tokens come."""

    request: GenerationRequest
    inbox: asyncio.Queue
    stops: list[str]
    tok: Any
    tokens: int = 0  # new tokens so far
    finish_reason: str | None = None

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces until the end (``finish_reason`` then set); a stop string ends it
        early, its text not sent."""
        ids: list[int] = []
        sent = ""
        try:
            while True:
                event = await self.inbox.get()
                if event.token_id is None:
                    if event.error is not None:
                        raise ApiError(500, f"generation failed: {event.error}", "engine_error")
                    self.finish_reason = "length" if event.finish_reason == "length" else "stop"
                    return
                ids.append(event.token_id)
                self.tokens = len(ids)
                text = self.tok.decode(ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # half a character: wait for the rest
                    continue
                cut = _find_stop(text, self.stops, len(sent))
                if cut >= 0:
                    self.finish_reason = "stop"
                    if cut > len(sent):
                        yield text[len(sent) : cut]
                    return
                if len(text) > len(sent):
                    yield text[len(sent) :]
                    sent = text
        finally:
            self.request.cancel()  # done, or the client went away: free the batch row


def _find_stop(text: str, stops: list[str], sent: int) -> int:
    """Where the first stop string starts in ``text`` (searching from what may overlap the
    text already sent), or -1."""
    found = [i for s in stops if s and (i := text.find(s, max(sent - len(s) + 1, 0))) >= 0]
    return min(found, default=-1)


class ChatService:
    """The request logic behind the routes: check, render, tokenize, submit, detokenize.

    Args:
        engine: the batching engine (its tokenizer renders and reads prompts).
        model_name: the id in ``/v1/models`` and in answers; requests must name it.
        retriever: answers ``retrieve: n``; ``None``: such requests get a 400.
        compress_documents: ``False`` reads passages as ordinary decoder tokens (the
            baseline a REFRAG server is compared with).
    """

    def __init__(
        self,
        engine: BatchingEngine,
        *,
        model_name: str,
        limits: ServeLimits | None = None,
        retriever: Retriever | None = None,
        compress_documents: bool = True,
        default_max_tokens: int = 256,
    ):
        self.engine, self.model_name = engine, model_name
        self.limits = limits or ServeLimits()
        self.retriever, self.compress = retriever, compress_documents
        self.default_max_tokens = default_max_tokens
        self.tok = copy.copy(template_tokenizer(engine.tok))  # caps here, not on the engine's
        self.tok.max_chunk_rows = self.limits.max_chunk_rows
        self.tok.max_text_chars = self.limits.max_request_bytes
        self.max_positions = getattr(engine.model.config.decoder, "max_position_embeddings", None)
        self.draining = False
        self._retrieve_lock = threading.Lock()

    # -- preparing a request ------------------------------------------------------------------
    def parse(self, body: bytes) -> ChatRequest:
        """The request body, checked; :class:`ApiError` names the first problem."""
        if len(body) > self.limits.max_request_bytes:
            raise ApiError(
                413,
                f"request body of {len(body):,} bytes is over the limit of "
                f"{self.limits.max_request_bytes:,}",
                "request_too_large",
            )
        try:
            req = ChatRequest.model_validate_json(body)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            raise ApiError(400, f"{where}: {first['msg']}", "invalid_request", where) from None
        if req.model != self.model_name:
            raise ApiError(
                404, f"model {req.model!r} not found; this server serves {self.model_name!r}",
                "model_not_found", "model",
            )  # fmt: skip
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported", "unsupported_value", "n")
        if not req.messages:
            raise ApiError(400, "messages must not be empty", "invalid_request", "messages")
        return req

    def prepare(self, req: ChatRequest) -> Prepared:
        """Render and tokenize ``req`` (retrieving first when it asks); checks every limit."""
        limit = self.limits
        max_new = req.max_completion_tokens or req.max_tokens or self.default_max_tokens
        if not 1 <= max_new <= limit.max_new_tokens:
            raise ApiError(
                400, f"max_tokens must be between 1 and {limit.max_new_tokens}, not {max_new}",
                "invalid_value", "max_tokens",
            )  # fmt: skip
        messages = [
            {"role": message_role(m.role), "content": message_text(m)} for m in req.messages
        ]
        retrieved = self._retrieve(req, messages) if req.retrieve else []
        text = render_chat(self.tok.decoder_tokenizer, messages)
        try:
            segments = self.tok.parse_segments(text)
            documents = sum(s.type == "encoder" for s in segments)
            if documents > limit.max_documents:
                raise ApiError(
                    400, f"{documents} documents in the prompt, over the limit of "
                    f"{limit.max_documents}", "too_many_documents", "messages",
                )  # fmt: skip
            if not self.compress:
                text = "".join(s.raw_text for s in segments)
            encoded = self.tok.encode(text)
        except (DocMarkupError, InvalidTextError) as err:
            raise ApiError(400, f"messages: {err}", "invalid_doc_markup", "messages") from None
        except TextTooLargeError as err:
            raise ApiError(400, str(err), "context_length_exceeded", "messages") from None
        positions = len(encoded["input_ids"])
        cap = min(limit.max_prompt_positions, (self.max_positions or 1 << 62) - max_new)
        if positions > cap:
            raise ApiError(
                400, f"the prompt takes {positions:,} decoder positions; this server allows "
                f"{cap:,} with max_tokens={max_new}", "context_length_exceeded", "messages",
            )  # fmt: skip
        return Prepared(
            encoded, max_new, positions, len(encoded["chunk_rows"]), documents, retrieved
        )

    def _retrieve(self, req: ChatRequest, messages: list[dict[str, str]]) -> list[str]:
        n = req.retrieve
        if self.retriever is None:
            raise ApiError(
                400, "this server has no passage index (start it with --index FOLDER)",
                "retrieval_unavailable", "retrieve",
            )  # fmt: skip
        if not 1 <= n <= self.limits.max_retrieve:
            raise ApiError(
                400, f"retrieve must be between 1 and {self.limits.max_retrieve}, not {n}",
                "invalid_value", "retrieve",
            )  # fmt: skip
        last = next((m for m in reversed(messages) if m["role"] == "user"), None)
        if last is None:
            raise ApiError(400, "retrieve needs a user message", "invalid_request", "messages")
        with self._retrieve_lock:  # one search at a time through the query encoder
            passages = self.retriever.search(last["content"], n)
        ids = [
            getattr(p, "passage_id", "") or f"{getattr(p, 'doc_id', 'passage')}#{i}"
            for i, p in enumerate(passages, 1)
        ]
        docs = "".join(doc_tag(p.text, i) + "\n" for p, i in zip(passages, ids))
        last["content"] = docs + last["content"]
        return ids

    # -- answering ----------------------------------------------------------------------------
    def submit(self, prep: Prepared, req: ChatRequest) -> Generation:
        """Queue ``prep`` on the engine (429 when too many are pending, 503 when stopping)."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[TokenEvent] = asyncio.Queue()
        request = GenerationRequest(
            prep.encoded,
            prep.max_new_tokens,
            sink=lambda ev: loop.call_soon_threadsafe(inbox.put_nowait, ev),
            temperature=req.temperature or 0.0,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
        )
        if self.engine.pending >= self.limits.max_pending:
            raise ApiError(429, "too many requests in flight; retry later", "server_overloaded")
        try:
            self.engine.submit(request)
        except EngineClosedError as err:
            raise ApiError(503, str(err), "server_shutting_down") from None
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return Generation(request, inbox, stops, self.tok)

    def health(self) -> dict[str, Any]:
        cache = self.engine.chunk_cache
        return {
            "status": "draining" if self.draining else "ok",
            "model": self.model_name,
            "pending": self.engine.pending,
            "engine": asdict(self.engine.stats),
            "chunk_cache": {"entries": len(cache), "hits": cache.hits, "misses": cache.misses},
        }


def create_app(service: ChatService) -> FastAPI:
    """The FastAPI app over ``service``; its lifespan starts and stops the engine."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.engine.start()
        yield
        service.draining = True
        await run_in_threadpool(service.engine.close)

    app = FastAPI(title="refrag serve", lifespan=lifespan)
    app.state.service = service

    @app.middleware("http")
    async def refuse_when_draining(request: Request, call_next):
        if service.draining and request.url.path != "/health":
            return ApiError(503, "the server is shutting down", "server_shutting_down").response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(service.health(), status_code=503 if service.draining else 200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": service.model_name, "object": "model", "created": 0, "owned_by": "refrag"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            req = service.parse(await request.body())
            prep = await run_in_threadpool(service.prepare, req)
            gen = service.submit(prep, req)
            if req.stream:
                return StreamingResponse(
                    _sse(service, prep, req, gen), media_type="text/event-stream"
                )
            return JSONResponse(await _complete(service, prep, gen))
        except ApiError as err:
            return err.response()

    return app


async def _complete(service: ChatService, prep: Prepared, gen: Generation) -> dict[str, Any]:
    text = "".join([piece async for piece in gen.pieces()])
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": service.model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": gen.finish_reason,
            }
        ],
        "usage": _usage(prep, gen.tokens),
        "refrag": _extra(prep),
    }


def _usage(prep: Prepared, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prep.prompt_positions,
        "completion_tokens": completion_tokens,
        "total_tokens": prep.prompt_positions + completion_tokens,
    }


def _extra(prep: Prepared) -> dict[str, Any]:
    """What REFRAG did with the prompt (an extra field; OpenAI clients keep it)."""
    return {"chunks": prep.chunks, "documents": prep.documents, "retrieved": prep.retrieved}


async def _sse(
    service: ChatService, prep: Prepared, req: ChatRequest, gen: Generation
) -> AsyncIterator[str]:
    """OpenAI's chunk events: the role, one per text piece, the finish reason, the usage
    (with ``stream_options.include_usage``), ``[DONE]``; an error mid-stream as an error
    event."""
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": service.model_name,
    }

    def event(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

    yield event({"role": "assistant", "content": ""})
    try:
        async for piece in gen.pieces():
            yield event({"content": piece})
    except ApiError as err:
        yield f"data: {err.response().body.decode()}\n\n"
        return
    yield event({}, gen.finish_reason)
    if req.stream_options and req.stream_options.include_usage:
        usage = {**base, "choices": [], "usage": _usage(prep, gen.tokens), "refrag": _extra(prep)}
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


class GracefulServer(uvicorn.Server):
    """uvicorn's server that marks the service draining the moment a signal arrives (so
    requests on open connections get 503) before uvicorn stops listening and waits for the
    requests in flight."""

    def __init__(self, config: uvicorn.Config, service: ChatService):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.service.draining = True
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # drained on purpose: exit 0, not re-raise the signal


def serve_http(
    service: ChatService, host: str = "127.0.0.1", port: int = 8000, grace_s: float = 60
) -> None:
    """Run the server until SIGTERM/SIGINT, then drain (at most ``grace_s`` seconds)."""
    config = uvicorn.Config(
        create_app(service), host=host, port=port, timeout_graceful_shutdown=grace_s
    )
    GracefulServer(config, service).run()


@contextlib.contextmanager
def running_server(
    service: ChatService, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
) -> Iterator[str]:
    """The server in a background thread for the duration of the block; yields its base URL
    (``http://host:port/v1``; port 0 picks a free one)."""
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level)
    server = GracefulServer(config, service)
    thread = threading.Thread(target=server.run, name="refrag-serve", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}/v1"
    finally:
        server.handle_exit(signal.SIGTERM, None)
        thread.join()
