"""REFRAG on vLLM: the encoder and projector run here, vLLM runs the decoder on the mixed
sequence through its prompt-embeddings input (``pip install .[vllm]``, a CUDA machine).

vLLM loads the decoder alone, from a plain Hugging Face folder: :func:`export_decoder`
writes one (``<checkpoint>/decoder``) from a REFRAG model. Each prompt becomes one
``(positions, hidden)`` tensor, exactly :meth:`RefragModel.embed_inputs` of the prompt:
the decoder's token embeddings with the projected chunk embeddings in the chunk positions
(from the model's chunk cache when it has one)::

    model, tok = load_refrag("results/checkpoints/run/sft", device="cuda")
    engine = VllmRefragEngine(model, tok, export_decoder(model, tok, "results/vllm/run"))
    outputs = engine.generate(["<doc id='1'>…</doc> Question: …? Answer:"], max_new_tokens=32)

Both paths (prompt embeddings, token ids) go through the same ``vllm.LLM`` (created with
``enable_prompt_embeds=True``), so a comparison with the plain decoder reading the full
passages as tokens shares the engine, its settings and its memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from refrag.modeling import RefragModel
from refrag.modeling.tokenization import RefragTokenizer
from refrag.serve.inference import model_inputs

try:  # optional extra: `pip install .[vllm]` (a CUDA build of torch comes with it)
    import vllm
except ImportError:  # the rest of refrag works without it
    vllm = None


class VllmUnavailableError(ImportError):
    """vLLM is not installed."""


def _require_vllm() -> Any:
    if vllm is None:
        raise VllmUnavailableError(
            "vLLM is not installed: `pip install .[vllm]` on a CUDA machine (it brings its own"
            " torch build; use a separate environment)"
        )
    return vllm


def export_decoder(
    model: RefragModel, tokenizer: RefragTokenizer | None, folder: str | Path
) -> Path:
    """Write the REFRAG model's decoder (weights + config, and its tokenizer when given) as a
    plain Hugging Face folder that vLLM can load; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.decoder.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.decoder_tokenizer.save_pretrained(folder)
    return folder


@torch.inference_mode()
def prompt_embeds(model: RefragModel, batch: Mapping[str, Any]) -> list[torch.Tensor]:
    """One ``(positions, hidden)`` tensor per row of an unpadded tokenizer batch: the mixed
    input embeddings :meth:`RefragModel.embed_inputs` builds for the decoder, on the CPU."""
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    mask = inputs.pop("attention_mask", None)
    if mask is not None and not bool(mask.all()):
        raise ValueError("prompt_embeds needs unpadded rows: tokenize one prompt per batch")
    embeds = model.embed_inputs(
        inputs["input_ids"],
        inputs.get("chunk_mask"),
        inputs.get("chunk_input_ids"),
        inputs.get("chunk_attention_mask"),
    )
    return [row.cpu() for row in embeds]


class VllmRefragEngine:
    """A ``vllm.LLM`` over the exported decoder, fed REFRAG's mixed sequences.

    Args:
        model: the REFRAG model (its encoder, projector and token embeddings are used here).
        tokenizer: its tokenizer (for text prompts); ``None`` for id/embedding prompts only.
        decoder_dir: the folder :func:`export_decoder` wrote.
        llm_kwargs: passed to ``vllm.LLM`` (``gpu_memory_utilization``, ``max_model_len``,
            ``enforce_eager``, ``enable_prefix_caching`` …). ``dtype`` defaults to the
            decoder's; ``skip_tokenizer_init`` to ``tokenizer is None``.
    """

    def __init__(
        self,
        model: RefragModel,
        tokenizer: RefragTokenizer | None,
        decoder_dir: str | Path,
        **llm_kwargs: Any,
    ):
        lib = _require_vllm()
        self.model, self.tokenizer = model, tokenizer
        dtype = next(model.decoder.parameters()).dtype
        llm_kwargs.setdefault("dtype", str(dtype).removeprefix("torch."))
        llm_kwargs.setdefault("skip_tokenizer_init", tokenizer is None)
        self.llm_kwargs = {"model": str(decoder_dir), "enable_prompt_embeds": True, **llm_kwargs}
        self.llm = lib.LLM(**self.llm_kwargs)

    def sampling(self, max_new_tokens: int, **kwargs: Any) -> Any:
        """Greedy ``vllm.SamplingParams`` for ``max_new_tokens`` (``kwargs`` override)."""
        settings = {"temperature": 0.0, "max_tokens": max_new_tokens} | kwargs
        if self.tokenizer is None:
            settings.setdefault("detokenize", False)
        return _require_vllm().SamplingParams(**settings)

    def embed(self, texts: Iterable[str]) -> list[torch.Tensor]:
        """The mixed-sequence prompt embeddings of each text (one tokenizer call each)."""
        if self.tokenizer is None:
            raise ValueError("text prompts need the tokenizer")
        return [prompt_embeds(self.model, self.tokenizer(text))[0] for text in texts]

    def generate_embeds(
        self, embeds: Sequence[torch.Tensor], max_new_tokens: int = 32, **sampling: Any
    ) -> list[Any]:
        """vLLM's outputs for prompts given as ``(positions, hidden)`` embeddings."""
        prompts = [{"prompt_embeds": e} for e in embeds]
        return self.llm.generate(prompts, self.sampling(max_new_tokens, **sampling))

    def generate_ids(
        self, ids: Sequence[Sequence[int]], max_new_tokens: int = 32, **sampling: Any
    ) -> list[Any]:
        """vLLM's outputs for plain token prompts (the baseline: the full passages as tokens)."""
        prompts = [{"prompt_token_ids": [int(t) for t in row]} for row in ids]
        return self.llm.generate(prompts, self.sampling(max_new_tokens, **sampling))

    def generate(self, texts: Iterable[str], max_new_tokens: int = 32, **sampling: Any) -> list:
        """vLLM's outputs for text prompts whose ``<doc>`` passages are read compressed."""
        return self.generate_embeds(self.embed(texts), max_new_tokens, **sampling)


def output_token_ids(outputs: Iterable[Any]) -> list[list[int]]:
    """The generated token ids of each ``vllm.RequestOutput`` (first completion)."""
    return [list(out.outputs[0].token_ids) for out in outputs]


__all__ = [
    "VllmRefragEngine",
    "VllmUnavailableError",
    "export_decoder",
    "output_token_ids",
    "prompt_embeds",
]
