"""The batching worker behind ``refrag serve``: one thread owns the model and runs requests
that arrive together as one batch, so they share every forward pass.

A request is a tokenized prompt (:meth:`RefragTokenizer.encode`) and its decoding settings.
The worker takes the first waiting request, gathers every other one that arrives within
``batch_wait_s`` (up to ``max_batch``), left-pads them into one batch (chunk rows of all of
them in one encoder pass, through the shared :class:`ChunkEmbeddingCache`), runs one
prefill and then one decode step per token for the whole batch, and sends each row's
tokens to its request as they come (:class:`TokenEvent`). Between decode steps, requests
that arrived meanwhile are prefilled together and join the running batch (their KV cache
and the batch's left-padded to one length), and finished rows leave it. Padded positions
are masked and every row keeps its own position ids, so a row's greedy tokens do not depend
on its batch::

    engine = BatchingEngine(model, tok, max_batch=8)
    engine.start()
    engine.submit(GenerationRequest(tok.encode(text), max_new_tokens=32, sink=print))
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from refrag.modeling import RefragModel
from refrag.modeling.tokenization import RefragTokenizer
from refrag.serve.chunk_cache import ChunkEmbeddingCache
from refrag.serve.inference import model_inputs

_STOP = object()


@dataclass
class TokenEvent:
    """What the worker sends a request: a new token, or the end (``finish_reason`` set:
    ``"stop"`` at an end-of-sequence token, ``"length"`` at ``max_new_tokens``,
    ``"cancelled"``, or ``"error"`` with ``error``)."""

    token_id: int | None = None
    finish_reason: str | None = None
    error: BaseException | None = None


@dataclass
class GenerationRequest:
    """One prompt to complete. ``sink`` is called from the worker thread with each
    :class:`TokenEvent`; ``temperature`` 0 is greedy, else sampling with ``seed``."""

    encoded: dict[str, list]
    max_new_tokens: int
    sink: Callable[[TokenEvent], None]
    temperature: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None
    finished: bool = False  # set by the worker with the last event

    def cancel(self) -> None:
        """Stop generating for this request (the client went away, or a stop string)."""
        self.cancelled.set()


@dataclass
class EngineStats:
    """Counts since start: prefill passes (each over the requests that arrived together),
    the largest batch, decoder forward passes (prefill and decode), and the
    rows those passes carried (``rows > forward_passes``: requests shared passes)."""

    requests: int = 0
    prefills: int = 0
    max_batch_seen: int = 0
    forward_passes: int = 0
    rows: int = 0
    tokens: int = 0
    joined: int = 0  # requests that joined a batch already decoding


class EngineClosedError(RuntimeError):
    """The engine is stopping and takes no new requests."""


class BatchingEngine:
    """A worker thread that batches :class:`GenerationRequest` s over one model.

    Args:
        model, tokenizer: the REFRAG model (eval mode, on its device) and its tokenizer.
        max_batch: most requests in one batch (1: no batching).
        batch_wait_s: how long the first request of a batch waits for others.
        chunk_cache: chunk embeddings shared by every request (default: a fresh one).
    """

    def __init__(
        self,
        model: RefragModel,
        tokenizer: RefragTokenizer,
        *,
        max_batch: int = 8,
        batch_wait_s: float = 0.005,
        chunk_cache: ChunkEmbeddingCache | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.model, self.tok = model, tokenizer
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.chunk_cache = chunk_cache if chunk_cache is not None else ChunkEmbeddingCache()
        model.use_chunk_cache(self.chunk_cache)
        self.device = next(model.parameters()).device
        eos = tokenizer.decoder_tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.stats = EngineStats()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._pending = 0  # submitted, not yet finished
        self._stopping = False  # the worker saw close()'s marker
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Requests submitted and not finished (waiting or in a batch)."""
        return self._pending

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="refrag-engine", daemon=True)
            self._thread.start()

    def submit(self, request: GenerationRequest) -> None:
        """Queue ``request``; raises :class:`EngineClosedError` once :meth:`close` was called."""
        with self._lock:
            if self._closed:
                raise EngineClosedError("the server is shutting down")
            self._pending += 1
            self.stats.requests += 1
        if request.temperature > 0:
            request.generator = torch.Generator()
            if request.seed is not None:
                request.generator.manual_seed(request.seed)
            else:
                request.generator.seed()
        self._queue.put(request)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued and running ones, stop the worker."""
        with self._lock:
            self._closed = True
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            group = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(group) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:  # finish this group, then whatever is still queued
                    self._stopping = True
                    break
                group.append(item)
            self._run_safely(group)
        while True:  # drain: requests queued before close() still get their answers
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                self._run_safely([item])

    def _run_safely(self, group: list[GenerationRequest]) -> None:
        live = [r for r in group if not r.cancelled.is_set()]
        for r in group:
            if r.cancelled.is_set():
                self._finish(r, TokenEvent(finish_reason="cancelled"))
        if not live:
            return
        try:
            self._run(live)
        except Exception as exc:  # noqa: BLE001 - every request of the batch hears of it
            for r in live:
                if not r.finished:
                    self._finish(r, TokenEvent(finish_reason="error", error=exc))

    def _finish(self, request: GenerationRequest, event: TokenEvent) -> None:
        request.finished = True
        with self._lock:
            self._pending -= 1
        request.sink(event)

    @torch.inference_mode()
    def _run(self, group: list[GenerationRequest]) -> None:
        """Prefill the group as one left-padded batch, then decode it step by step; between
        steps, requests that arrived meanwhile are prefilled and join the batch."""
        batch = self._prefill(group)
        tokens = self._emit(batch)
        while True:
            room = self.max_batch - len(batch.requests)
            if room > 0 and batch.joinable and not self._stopping:
                waiting = self._take_waiting(room)
                if waiting:
                    group.extend(waiting)  # so that an error reaches them too
                    joined = self._prefill(waiting)
                    self.stats.joined += len(waiting) if batch.requests else 0
                    batch, tokens = _merge(batch, tokens, joined, self._emit(joined))
            if not batch.requests:
                return
            n = len(batch.requests)
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, n)
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(n, 1)], dim=1)
            out = self.model.decoder(
                input_ids=torch.tensor(tokens, device=self.device).view(n, 1),
                attention_mask=batch.mask,
                position_ids=batch.next_position,
                cache=batch.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            self._count(n)
            batch.next_position = batch.next_position + 1
            batch.logits = out.logits[:, -1]
            tokens = self._emit(batch)

    def _prefill(self, group: list[GenerationRequest]) -> _Batch:
        """One left-padded prefill of ``group`` (every row with its own position ids)."""
        n = len(group)
        self.stats.prefills += 1
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, n)
        batch = self.tok.pad([r.encoded for r in group], padding_side="left")
        inputs = model_inputs(batch, self.device)
        mask = inputs.pop("attention_mask")
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        embeds = self.model.embed_inputs(**inputs)
        cache = DynamicCache(config=self.model.config.decoder)
        out = self.model.decoder(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._count(n)
        return _Batch(list(group), [0] * n, cache, mask, positions[:, -1:] + 1, out.logits[:, -1])

    def _emit(self, batch: _Batch) -> list[int]:
        """Pick each row's next token and send it; drop the rows that finished. Returns the
        tokens of the remaining rows (the next decode step's input)."""
        tokens = self._pick(batch.requests, batch.logits)
        keep = []
        for i, r in enumerate(batch.requests):
            if r.cancelled.is_set():
                self._finish(r, TokenEvent(finish_reason="cancelled"))
                continue
            if tokens[i] in self.eos_ids and not r.ignore_eos:
                self._finish(r, TokenEvent(finish_reason="stop"))
                continue
            batch.produced[i] += 1
            self.stats.tokens += 1
            r.sink(TokenEvent(token_id=tokens[i]))
            if batch.produced[i] >= r.max_new_tokens:
                self._finish(r, TokenEvent(finish_reason="length"))
                continue
            keep.append(i)
        if len(keep) < len(batch.requests):
            batch.select(keep)
        return [tokens[i] for i in keep]

    def _take_waiting(self, most: int) -> list[GenerationRequest]:
        """Up to ``most`` queued requests, without waiting (a stop marker is remembered)."""
        out = []
        while len(out) < most:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._stopping = True
                break
            if item.cancelled.is_set():
                self._finish(item, TokenEvent(finish_reason="cancelled"))
            else:
                out.append(item)
        return out

    def _count(self, rows: int) -> None:
        self.stats.forward_passes += 1
        self.stats.rows += rows

    @staticmethod
    def _pick(group: list[GenerationRequest], logits: torch.Tensor) -> list[int]:
        """The next token per row: greedy, or sampled at the row's temperature."""
        tokens = logits.argmax(-1).tolist()
        for i, r in enumerate(group):
            if r.temperature > 0:
                probs = torch.softmax(logits[i].float().cpu() / r.temperature, dim=-1)
                tokens[i] = int(torch.multinomial(probs, 1, generator=r.generator))
        return tokens


@dataclass
class _Batch:
    """Rows decoding together: their requests, tokens so far, KV cache, attention mask
    ``(n, T)``, next position ids ``(n, 1)`` and the last pass's logits ``(n, vocab)``."""

    requests: list[GenerationRequest]
    produced: list[int]
    cache: DynamicCache
    mask: torch.Tensor
    next_position: torch.Tensor
    logits: torch.Tensor

    @property
    def joinable(self) -> bool:
        """Whether rows can be appended: every cache layer a plain :class:`DynamicLayer`."""
        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def select(self, keep: list[int]) -> None:
        """Keep only the rows ``keep``."""
        self.requests = [self.requests[i] for i in keep]
        self.produced = [self.produced[i] for i in keep]
        if keep:
            index = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.next_position = self.mask[index], self.next_position[index]


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _merge(
    a: _Batch, a_tokens: list[int], b: _Batch, b_tokens: list[int]
) -> tuple[_Batch, list[int]]:
    """``b``'s rows appended to ``a``'s: the shorter KV cache and mask are left-padded
    (masked, so no row reads the padding)."""
    if not a.requests:
        return b, b_tokens
    if not b.requests:
        return a, a_tokens
    length = max(a.mask.shape[1], b.mask.shape[1])
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        la.keys = torch.cat([_left_pad(la.keys, length, 2), _left_pad(lb.keys, length, 2)])
        la.values = torch.cat([_left_pad(la.values, length, 2), _left_pad(lb.values, length, 2)])
    a.mask = torch.cat([_left_pad(a.mask, length, 1), _left_pad(b.mask, length, 1)])
    a.next_position = torch.cat([a.next_position, b.next_position])
    a.requests += b.requests
    a.produced += b.produced
    return a, a_tokens + b_tokens
