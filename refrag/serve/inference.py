"""Fast REFRAG inference: loading, prefill, KV-cached decoding, streaming and CUDA graphs.

Time-to-first-token is one encoder pass over the chunks that are not cached yet (see
:mod:`refrag.serve.chunk_cache`), one scatter into the decoder's input embeddings and one decoder
prefill over ``s/k`` chunk positions plus the prompt tokens; every later token is one
ordinary decoder step against the KV cache (:class:`transformers.DynamicCache`)::

    model, tok = load_refrag(device="cuda")          # bf16 + SDPA on a GPU
    model.use_chunk_cache(ChunkEmbeddingCache())
    batch = tok("<doc id='1'>…</doc> Question: …? Answer:")
    ids = greedy_generate(model, batch, max_new_tokens=32)          # prefill + decode steps
    for piece in stream_generate(model, tok, batch).pieces: print(piece, end="")
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from threading import Thread
from typing import Any

import torch
from transformers import DynamicCache, TextIteratorStreamer

from refrag.io.integrity import verify_folder
from refrag.io.models import (
    DEFAULT_CACHE_DIR,
    DEFAULT_DECODER,
    DEFAULT_ENCODER,
    check_specs,
    resolve_model,
)
from refrag.modeling import RefragModel
from refrag.modeling.tokenization import RefragTokenizer
from refrag.serve.chunk_cache import ChunkEmbeddingCache
from refrag.serve.kv_caches import RunnerLayer, prefill_cache, runner_cache

MODEL_KEYS = (
    "input_ids",
    "attention_mask",
    "chunk_mask",
    "chunk_input_ids",
    "chunk_attention_mask",
)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on a CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_refrag(
    checkpoint: str | Path | None = None,
    *,
    decoder: str = DEFAULT_DECODER,
    encoder: str = DEFAULT_ENCODER,
    compression: int = 16,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
) -> tuple[RefragModel, RefragTokenizer]:
    """A model and its tokenizer in eval mode on ``device``.

    ``checkpoint`` is a folder written by ``RefragModel.save_pretrained`` (with the
    ``RefragTokenizer`` saved next to it, or tokenizers taken from ``encoder``/``decoder``);
    without one the model is assembled from the ``encoder`` and ``decoder`` specs with a
    random projector (fine for timing, not for answers).
    """
    dtype = dtype or default_dtype(device)
    if checkpoint is None:  # every spec checked before any is fetched
        check_specs([encoder, decoder], cache_dir)
    if checkpoint is not None:
        path = Path(checkpoint)
        verify_folder(path)  # a damaged or half-written checkpoint is refused, named
        model = RefragModel.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation
        )
        if (path / "refrag_tokenizer.json").is_file():
            tok = RefragTokenizer.from_pretrained(path)
        else:
            tok = _tokenizer_from_specs(
                encoder=encoder, decoder=decoder, k=model.config.compression, cache_dir=cache_dir
            )
    else:
        model = RefragModel.from_encoder_decoder_pretrained(
            encoder_name_or_path=str(resolve_model(encoder, cache_dir)),
            decoder_name_or_path=str(resolve_model(decoder, cache_dir)),
            dtype=dtype,
            attn_implementation=attn_implementation,
            compression=compression,
        )
        tok = _tokenizer_from_specs(
            encoder=encoder, decoder=decoder, k=compression, cache_dir=cache_dir
        )
    return model.to(device).eval(), tok


def _tokenizer_from_specs(
    *, encoder: str, decoder: str, k: int, cache_dir: str | Path
) -> RefragTokenizer:
    check_specs([encoder, decoder], cache_dir)
    return RefragTokenizer.from_encoder_decoder_pretrained(
        encoder_name_or_path=str(resolve_model(encoder, cache_dir)),
        decoder_name_or_path=str(resolve_model(decoder, cache_dir)),
        compression=k,
    )


def model_inputs(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The model's tensors from a tokenizer batch (no labels), moved to ``device``."""
    return {
        k: batch[k].to(device, non_blocking=True) for k in MODEL_KEYS if batch.get(k) is not None
    }


@dataclass
class Prefill:
    """The result of reading the prompt: the first new token, its logits and the KV cache."""

    next_token: torch.Tensor  # (B,)
    logits: torch.Tensor  # (B, vocab), last position
    cache: DynamicCache


@torch.inference_mode()
def prefill(
    model: RefragModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_mask: torch.Tensor | None = None,
    chunk_input_ids: torch.Tensor | None = None,
    chunk_attention_mask: torch.Tensor | None = None,
    chunk_embeds: torch.Tensor | None = None,
) -> Prefill:
    """One pass over the mixed prompt (chunk embeddings from ``chunk_embeds``, the model's
    chunk cache, or the encoder); returns the greedy first token and a filled KV cache."""
    embeds = model.embed_inputs(
        input_ids, chunk_mask, chunk_input_ids, chunk_attention_mask, chunk_embeds
    )
    cache = prefill_cache(model.config.decoder)
    out = model.decoder(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    logits = out.logits[:, -1]
    return Prefill(logits.argmax(-1), logits, cache)


@torch.inference_mode()
def decode_step(model: RefragModel, token: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Feed one token per row through the decoder against ``cache``; logits ``(B, vocab)``."""
    out = model.decoder(input_ids=token.view(-1, 1), cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


@torch.inference_mode()
def greedy_generate(
    model: RefragModel,
    batch: Mapping[str, Any],
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy decoding with a KV cache for unpadded batches: one :func:`prefill`, then one
    :func:`decode_step` per token. Returns the new tokens ``(B, n)``; stops early when every
    row has produced ``eos_token_id``."""
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    if "attention_mask" in inputs and not bool(inputs["attention_mask"].all()):
        raise ValueError(
            "greedy_generate needs unpadded rows; use RefragModel.generate for padded batches"
        )
    inputs.pop("attention_mask", None)
    state = prefill(model, **inputs)
    tokens = [state.next_token]
    done = state.next_token == eos_token_id if eos_token_id is not None else None
    while len(tokens) < max_new_tokens and not (done is not None and bool(done.all())):
        token = decode_step(model, tokens[-1], state.cache).argmax(-1)
        if done is not None:
            token = token.masked_fill(done, eos_token_id)
            done = done | (token == eos_token_id)
        tokens.append(token)
    return torch.stack(tokens, dim=1)


class TimedTextStreamer(TextIteratorStreamer):
    """A :class:`TextIteratorStreamer` that also records when the first new token arrived and
    keeps the new token ids."""

    def __init__(self, tokenizer: Any, **kwargs: Any):
        super().__init__(tokenizer, skip_prompt=True, **kwargs)
        self.started_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.token_ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.token_ids.extend(value.reshape(-1).tolist())
        super().put(value)

    def end(self) -> None:
        self.finished_at = time.perf_counter()
        super().end()


@dataclass
class StreamedGeneration:
    """Iterate ``pieces`` for text as it is generated; timings are set once it is exhausted."""

    streamer: TimedTextStreamer
    thread: Thread
    error: list[BaseException] = field(default_factory=list)

    @property
    def pieces(self) -> Iterator[str]:
        yield from self.streamer
        self.thread.join()
        if self.error:
            raise self.error[0]

    @property
    def ttft_s(self) -> float:
        """Seconds from the call to the first new token."""
        s = self.streamer
        return (s.first_token_at or s.finished_at or s.started_at) - s.started_at

    @property
    def token_ids(self) -> list[int]:
        return self.streamer.token_ids

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first one (the TTIT regime)."""
        s = self.streamer
        if s.first_token_at is None or s.finished_at is None or len(s.token_ids) < 2:
            return float("nan")
        return (len(s.token_ids) - 1) / max(s.finished_at - s.first_token_at, 1e-9)


def stream_generate(
    model: RefragModel, tok: RefragTokenizer, batch: Mapping[str, Any], **generate_kwargs: Any
) -> StreamedGeneration:
    """Start ``model.generate`` (HF generate with a KV cache) in a thread; stream its text."""
    device = next(model.parameters()).device
    streamer = TimedTextStreamer(tok.decoder_tokenizer, skip_special_tokens=True)
    inputs = model_inputs(batch, device)
    generate_kwargs.setdefault("pad_token_id", tok.decoder_pad_token_id)
    result = StreamedGeneration(streamer, Thread())

    def work() -> None:
        try:
            model.generate(**inputs, streamer=streamer, **generate_kwargs)
        except BaseException as exc:  # surfaced to the reader by `pieces`
            result.error.append(exc)
            streamer.end()

    result.thread = Thread(target=work, daemon=True)
    result.thread.start()
    return result


class StaticRunner:
    """Prefill of one fixed prompt shape, then decode steps, against a static KV cache.

    Every tensor the hot path touches is allocated here once: the prompt ids ``(1, T)``, the
    chunk embeddings ``(n, d)`` (or, with ``encode=True``, the chunk rows ``(n, W)`` that
    the encoder and projector turn into them inside the step), the positions, the next token
    and a :class:`transformers.StaticCache` of ``T + max_new_tokens``. ``prefill`` copies
    new inputs into those buffers and runs one step; ``decode`` feeds the last token back.
    With ``graph=True`` (CUDA) both steps are captured once as CUDA graphs and replayed: no
    Python, no allocation and no host sync until the caller reads the token. On a CPU (or
    with ``graph=False``) the same steps run eagerly, which is what the tests compare with
    :func:`prefill` / :func:`decode_step`.

    Args:
        model: the REFRAG model (its decoder alone for a plain prompt: ``chunk_positions``
            empty).
        length: T, prompt positions (chunk positions included).
        chunk_positions: ``(n,)`` indices of the chunk positions in the prompt (batch 1).
        row_width: W, set for ``encode=True``.
    """

    def __init__(
        self,
        model: RefragModel,
        length: int,
        chunk_positions: torch.Tensor | None = None,
        *,
        encode: bool = False,
        row_width: int | None = None,
        max_new_tokens: int = 16,
        graph: bool = False,
        warmup: int = 2,
    ):
        self.model, self.decoder = model, model.decoder
        device = next(self.decoder.parameters()).device
        dtype = self.decoder.get_input_embeddings().weight.dtype
        n = 0 if chunk_positions is None else int(chunk_positions.numel())
        self.ids = torch.zeros(1, length, dtype=torch.long, device=device)
        self.positions = torch.arange(length, device=device).unsqueeze(0)
        self.chunk_positions = (
            chunk_positions.to(device) if n else torch.zeros(0, dtype=torch.long, device=device)
        )
        self.chunk_embeds = torch.zeros(
            n, self.decoder.config.hidden_size, dtype=dtype, device=device
        )
        self.encode = encode and n > 0
        if self.encode:
            self.rows = torch.zeros(n, row_width, dtype=torch.long, device=device)
            self.row_mask = torch.ones(n, row_width, dtype=torch.long, device=device)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.logits = torch.zeros(1, self.decoder.config.vocab_size, dtype=dtype, device=device)
        self.step_position = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.cache = runner_cache(self.decoder.config, length + max_new_tokens)
        self.graph = graph and device.type == "cuda"
        self._prefill_graph = self._decode_graph = None
        if self.graph:
            self._prefill_graph = self._capture(self._prefill_step, warmup)
            self._decode_graph = self._capture(self._decode_step, warmup)

    def _prefilling(self, on: bool) -> None:
        for layer in self.cache.layers:
            if isinstance(layer, RunnerLayer):
                layer.prefilling = on
            elif on and getattr(layer, "is_initialized", False):  # rewrite from position 0
                layer.cumulative_length.zero_()

    @torch.inference_mode()
    def _prefill_step(self) -> None:
        self._prefilling(True)
        try:
            self._prefill_embed_and_run()
        finally:
            self._prefilling(False)

    def _prefill_embed_and_run(self) -> None:
        embeds = self.decoder.get_input_embeddings()(self.ids)
        if self.chunk_positions.numel():
            chunks = self.chunk_embeds
            if self.encode:
                chunks = self.model.encode_chunks(self.rows, self.row_mask)
            embeds[0].index_copy_(0, self.chunk_positions, chunks.to(embeds.dtype))
        out = self.decoder(
            inputs_embeds=embeds,
            position_ids=self.positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._finish(out.logits[:, -1])
        self.step_position.fill_(self.ids.shape[1])

    @torch.inference_mode()
    def _decode_step(self) -> None:
        out = self.decoder(
            input_ids=self.token,
            position_ids=self.step_position,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._finish(out.logits[:, -1])
        self.step_position.add_(1)

    def _finish(self, logits: torch.Tensor) -> None:
        self.logits.copy_(logits)
        self.token.copy_(logits.argmax(-1, keepdim=True))

    def _capture(self, step, warmup: int) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._prefill_step()  # a decode step needs a filled cache before it
                if step is self._decode_step:
                    step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph

    def prefill(
        self,
        input_ids: torch.Tensor,
        chunk_embeds: torch.Tensor | None = None,
        chunk_input_ids: torch.Tensor | None = None,
        chunk_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Read a prompt of the captured shape; returns the next token ``(1, 1)`` (a static
        buffer: read it before the next call). Chunk inputs: embeddings, or rows with
        ``encode=True``."""
        self.ids.copy_(input_ids, non_blocking=True)
        if chunk_embeds is not None:
            self.chunk_embeds.copy_(chunk_embeds, non_blocking=True)
        if self.encode and chunk_input_ids is not None:
            self.rows.copy_(chunk_input_ids, non_blocking=True)
            self.row_mask.copy_(chunk_attention_mask, non_blocking=True)
        if self._prefill_graph is not None:
            self._prefill_graph.replay()
        else:
            self._prefill_step()
        return self.token

    def decode(self) -> torch.Tensor:
        """One decode step from the last token; returns the next one (static buffer)."""
        if self._decode_graph is not None:
            self._decode_graph.replay()
        else:
            self._decode_step()
        return self.token


def try_static_runner(model: RefragModel, length: int, **kwargs: Any) -> StaticRunner | None:
    """A :class:`StaticRunner`, or ``None`` (with a warning) where CUDA-graph capture fails."""
    try:
        return StaticRunner(model, length, **kwargs)
    except Exception as exc:  # capture is best effort: the eager path stays correct
        warnings.warn(
            f"CUDA-graph capture of a {length}-position prompt failed ({exc}); running eager",
            stacklevel=2,
        )
        return None


__all__ = [
    "ChunkEmbeddingCache",
    "Prefill",
    "StaticRunner",
    "StreamedGeneration",
    "TimedTextStreamer",
    "decode_step",
    "default_dtype",
    "greedy_generate",
    "load_refrag",
    "model_inputs",
    "prefill",
    "prefill_cache",
    "runner_cache",
    "stream_generate",
    "try_static_runner",
]
