"""Selective compression: keep some chunks of the context as tokens, chosen by a policy.

A window's context is cut into L chunks of k encoder tokens (the rows the encoder reads).
A *mixed input* expands a chosen subset of them: an expanded chunk is its text (cut from
``context_text`` at the encoder tokens' character ends, ``context_encoder_ends``) tokenized
by the decoder; every other chunk stays one chunk embedding. The decoder reads
``Σ tokens(expanded) + #compressed`` context positions (:func:`mixed_parts`). At most a
fraction ``p`` is expanded: ``⌊p·L⌋`` chunks (:func:`expand_count`). Three ways to choose:

- ``refrag_random``: uniformly at random (also how the model is trained to read mixed
  inputs: :func:`mixed_dataset`, a fresh p ~ U[0, max_fraction] per example, as the paper
  trains with random p first);
- ``refrag_heuristic`` (perplexity heuristic): one decoder pass over the whole context as
  tokens gives each context token its NLL given the tokens before it; a chunk's score is the
  mean NLL of its tokens; the ``⌊p·L⌋`` chunks with the highest score are expanded (ties: the
  earlier chunk). Hard-to-predict text is what a chunk embedding is least likely to convey;
  this reads the full context once, so it is a reference, not a fast path;
- ``refrag_rl``: a small policy (:class:`ChunkPolicy`: a 2-layer transformer over the
  chunk embeddings, one logit per chunk) samples ``⌊p·L⌋`` distinct chunks without
  replacement (Gumbel-top-m, i.e. Plackett–Luce; padded chunks masked to −inf) and is trained
  with REINFORCE (:func:`reinforce_step`): reward = −log-ppl of the window's continuation
  given the mixed input (the REFRAG model frozen), baseline = the mean reward of the other
  samples of the same window (leave-one-out), loss = −advantage · log π(selection). At
  evaluation the policy expands its top ``⌊p·L⌋`` logits.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from refrag.tokenization import IGNORE_INDEX, RefragTokenizer

SELECTORS = ("refrag_rl", "refrag_random", "refrag_heuristic")


# -- mixed inputs ---------------------------------------------------------------------------
def expand_count(n_chunks: int, p: float) -> int:
    """How many of ``n_chunks`` chunks are expanded at fraction ``p``: ``⌊p·n⌋`` (at most p)."""
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return math.floor(p * n_chunks + 1e-9)


def chunk_spans(row: dict, k: int) -> list[tuple[int, int]]:
    """Character span of each chunk of a window's context: chunk i covers the encoder tokens
    ``i·k … i·k+k−1``, from the end of the previous chunk's last token to the end of its own."""
    ends = list(row["context_encoder_ends"])
    spans, start = [], 0
    for i in range(0, len(ends), k):
        end = ends[min(i + k, len(ends)) - 1]
        spans.append((start, end))
        start = end
    return spans


def mixed_parts(
    row: dict, tok: RefragTokenizer, expand: Iterable[int], target: bool = True
) -> list[tuple[str, list[int]]]:
    """:meth:`RefragTokenizer.encode_parts` parts of a window whose chunks ``expand`` are
    decoder tokens of their text and the others chunk embeddings; then the target (labelled)."""
    k, enc = tok.compression, list(row["context_encoder_ids"])
    expand = set(expand)
    parts: list[tuple[str, list[int]]] = []
    run: list[int] = []  # encoder ids of consecutive compressed chunks (whole chunks: rows stay)
    for i, (start, end) in enumerate(chunk_spans(row, k)):
        if i in expand:
            if run:
                parts.append(("chunks", run))
                run = []
            text = row["context_text"][start:end]
            parts.append(
                ("prompt", tok.decoder_tokenizer(text, add_special_tokens=False)["input_ids"])
            )
        else:
            run += enc[i * k : (i + 1) * k]
    if run:
        parts.append(("chunks", run))
    return parts + ([("text", list(row["target_ids"]))] if target else [])


def context_positions(example: dict, tok: RefragTokenizer) -> int:
    """Decoder positions an encoded mixed input spends on its context (no BOS, no target)."""
    return len(example["input_ids"]) - sum(example["label_mask"]) - (tok.bos_token_id is not None)


def random_selection(n_chunks: int, p: float, rng: random.Random) -> list[int]:
    """``⌊p·n⌋`` distinct chunks drawn uniformly."""
    return sorted(rng.sample(range(n_chunks), expand_count(n_chunks, p)))


def mixed_examples(
    windows: Sequence[dict], tok: RefragTokenizer, *, max_fraction: float, total: int, seed: int
) -> list[dict]:
    """``total`` mixed inputs cycling over ``windows``, each expanding a random subset at a
    fresh p ~ U[0, max_fraction]."""
    rng = random.Random(seed)
    examples = []
    for i in range(total):
        row = windows[i % len(windows)]
        n = len(chunk_spans(row, tok.compression))
        chosen = random_selection(n, rng.uniform(0, max_fraction), rng)
        examples.append(tok.encode_parts(mixed_parts(row, tok, chosen)))
    return examples


def mixed_dataset(data: str | os.PathLike, tok: RefragTokenizer, hp, *, max_fraction: float = 0.5):
    """Registry-shaped ``(data, tok, hp) -> (dataset, collator)``: mixed continuation examples
    of the train shards at random p (train with ``refrag.training:causal_lm_trainer``)."""
    from refrag.data import read_shards
    from refrag.training import ExampleDataset

    windows = read_shards(data).to_dict("records")
    total = hp.steps * hp.batch_size * hp.grad_accum
    examples = mixed_examples(windows, tok, max_fraction=max_fraction, total=total, seed=hp.seed)
    return ExampleDataset(examples), tok.pad


# -- scoring a window under several selections -------------------------------------------------
@torch.no_grad()
def chunk_embeddings(model, tok: RefragTokenizer, row: dict) -> torch.Tensor:
    """The projected embedding of every chunk of a window's context, ``(L, hidden)``."""
    batch = tok.pad([tok.encode_parts([("chunks", list(row["context_encoder_ids"]))])])
    device = next(model.parameters()).device
    return model.encode_chunks(
        batch["chunk_input_ids"].to(device), batch["chunk_attention_mask"].to(device)
    )


@torch.no_grad()
def selection_nll(
    model,
    tok: RefragTokenizer,
    row: dict,
    selections: Sequence[Iterable[int]],
    embeds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """For each selection of chunks to expand: summed target NLL, target token count and
    context positions. ``embeds`` are the window's chunk embeddings (the encoder is not rerun)."""
    examples = [tok.encode_parts(mixed_parts(row, tok, s)) for s in selections]
    batch = tok.pad(examples)
    device = embeds.device
    kept = torch.cat(
        [embeds[[i for i in range(len(embeds)) if i not in set(s)]] for s in selections]
    )
    logits = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        chunk_mask=batch["chunk_mask"].to(device),
        chunk_embeds=kept,
    ).logits
    labels = batch["labels"][:, 1:].to(device)
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    count = (labels != IGNORE_INDEX).sum(1)
    return nll.sum(1), count, [context_positions(e, tok) for e in examples]


def rewards(model, tok, row, selections, embeds) -> torch.Tensor:
    """Reward of each selection: −log-ppl (minus the mean NLL per target token)."""
    nll, count, _ = selection_nll(model, tok, row, selections, embeds)
    return -(nll / count)


@torch.no_grad()
def chunk_surprise(model, tok: RefragTokenizer, row: dict) -> torch.Tensor:
    """The perplexity heuristic's score of each chunk: mean decoder NLL of its tokens, reading
    the whole context as tokens (after BOS where the tokenizer adds one)."""
    spans = chunk_spans(row, tok.compression)
    pieces = [
        tok.decoder_tokenizer(row["context_text"][a:b], add_special_tokens=False)["input_ids"]
        for a, b in spans
    ]
    bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
    ids = torch.tensor([bos + [t for piece in pieces for t in piece]])
    device = next(model.parameters()).device
    logits = model.decoder(input_ids=ids.to(device)).logits[0, :-1].float()
    nll = F.cross_entropy(logits, ids[0, 1:].to(device), reduction="none")
    if not bos:  # the first context token has nothing before it
        nll = torch.cat([nll.new_full((1,), float("nan")), nll])
    scores, start = [], 0  # nll[j]: NLL of context token j
    for piece in pieces:
        values = nll[start : start + len(piece)]
        values = values[~values.isnan()]
        scores.append(values.mean() if len(values) else nll.new_zeros(()))
        start += len(piece)
    return torch.stack(scores)


def top_selection(scores: torch.Tensor, m: int) -> list[int]:
    """The ``m`` highest-scoring chunks (ties: the earlier one), sorted."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:m])


# -- the policy ---------------------------------------------------------------------------------
class ChunkPolicy(nn.Module):
    """A small transformer over a context's chunk embeddings: one logit per chunk."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int = 64,
        layers: int = 2,
        heads: int = 4,
        max_chunks: int = 2048,
    ):
        super().__init__()
        self.config = {
            "input_size": input_size,
            "hidden_size": hidden_size,
            "layers": layers,
            "heads": heads,
            "max_chunks": max_chunks,
        }
        self.norm = nn.LayerNorm(input_size)
        self.proj = nn.Linear(input_size, hidden_size)
        self.position = nn.Embedding(max_chunks, hidden_size)
        layer = nn.TransformerEncoderLayer(
            hidden_size, heads, 2 * hidden_size, dropout=0.0, batch_first=True
        )
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, chunk_embeds: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L, d)`` embeddings (``mask``: True for real chunks) → ``(B, L)`` logits,
        −inf at masked chunks."""
        if mask is None:
            mask = torch.ones(chunk_embeds.shape[:2], dtype=torch.bool, device=chunk_embeds.device)
        positions = torch.arange(chunk_embeds.shape[1], device=chunk_embeds.device)
        x = self.proj(self.norm(chunk_embeds.float())) + self.position(positions)
        x = self.body(x, src_key_padding_mask=~mask)
        return self.head(x).squeeze(-1).masked_fill(~mask, float("-inf"))


def sample_selection(
    logits: torch.Tensor, m: int, generator: torch.Generator | None = None
) -> tuple[list[int], torch.Tensor]:
    """``m`` distinct chunks sampled from ``softmax(logits)`` without replacement
    (Gumbel-top-m) and the log-probability of that draw in order (Plackett–Luce). Chunks at
    −inf are never chosen; ``m`` is capped at the number of the others."""
    m = min(m, int(torch.isfinite(logits).sum()))
    u = torch.rand(logits.shape, generator=generator).to(logits.device).clamp(1e-12, 1 - 1e-12)
    order = torch.topk(logits.detach() - torch.log(-torch.log(u)), m).indices.tolist()
    log_prob, remaining = logits.new_zeros(()), logits
    for i in order:
        log_prob = log_prob + F.log_softmax(remaining, -1)[i]
        remaining = remaining.index_fill(0, torch.tensor([i], device=logits.device), float("-inf"))
    return sorted(order), log_prob


def reinforce_step(
    policy: ChunkPolicy,
    optimizer: torch.optim.Optimizer,
    windows: Sequence[tuple[torch.Tensor, int, Callable[[list[list[int]]], torch.Tensor]]],
    *,
    samples: int = 4,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One policy-gradient step over ``windows``, each ``(chunk embeddings (L, d), m,
    reward_fn)``: draw ``samples`` selections of m chunks, score them with ``reward_fn``,
    subtract the leave-one-out mean reward, and ascend advantage · log-probability."""
    if samples < 2:
        raise ValueError("REINFORCE with a leave-one-out baseline needs samples >= 2")
    losses, all_rewards = [], []
    for embeds, m, reward_fn in windows:
        logits = policy(embeds[None])[0]
        draws = [sample_selection(logits, m, generator) for _ in range(samples)]
        reward = reward_fn([sel for sel, _ in draws]).detach().float()
        baseline = (reward.sum() - reward) / (samples - 1)
        log_probs = torch.stack([lp for _, lp in draws])
        losses.append(-((reward - baseline).to(log_probs.device) * log_probs).mean())
        all_rewards.append(reward.mean())
    loss = torch.stack(losses).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "reward": torch.stack(all_rewards).mean().item()}


def train_policy(
    model,
    tok: RefragTokenizer,
    windows: Sequence[dict],
    *,
    p: float,
    steps: int,
    batch_size: int = 4,
    samples: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
    policy: ChunkPolicy | None = None,
    log: Callable[[dict], None] | None = print,
) -> tuple[ChunkPolicy, list[dict]]:
    """Train a :class:`ChunkPolicy` by REINFORCE against the frozen REFRAG ``model`` on
    ``windows`` (shard rows), at expansion fraction ``p``; returns it and the per-step log
    (``step``, ``reward``: mean −log-ppl of the sampled selections, ``loss``)."""
    torch.manual_seed(seed)
    model.eval().requires_grad_(False)
    device = next(model.parameters()).device
    policy = policy or ChunkPolicy(model.config.decoder.hidden_size)
    policy.to(device).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps):
        batch = []
        for j in range(batch_size):
            row = windows[(step * batch_size + j) % len(windows)]
            embeds = chunk_embeddings(model, tok, row)
            m = expand_count(len(embeds), p)
            if m == 0:
                continue

            def reward_fn(selections, row=row, embeds=embeds):
                return rewards(model, tok, row, selections, embeds)

            batch.append((embeds, m, reward_fn))
        if not batch:
            raise ValueError(f"no window has a chunk to expand at p={p}")
        entry = {"step": step + 1} | reinforce_step(
            policy, optimizer, batch, samples=samples, generator=generator
        )
        history.append(entry)
        if log is not None:
            log(entry)
    return policy.eval(), history


def save_policy(policy: ChunkPolicy, folder: str | os.PathLike, extra: dict | None = None) -> None:
    """``policy.safetensors``, ``policy_config.json`` and ``extra`` JSON files in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in policy.state_dict().items()}, folder / "policy.safetensors"
    )
    (folder / "policy_config.json").write_text(json.dumps(policy.config, indent=2) + "\n")
    for name, content in (extra or {}).items():
        (folder / name).write_text(json.dumps(content, indent=2, default=str) + "\n")


def load_policy(folder: str | os.PathLike) -> ChunkPolicy:
    folder = Path(folder)
    policy = ChunkPolicy(**json.loads((folder / "policy_config.json").read_text()))
    policy.load_state_dict(load_file(folder / "policy.safetensors"))
    return policy.eval()


# -- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_selective(
    model,
    tok: RefragTokenizer,
    windows: Sequence[dict],
    *,
    p: float,
    selector: str,
    policy: ChunkPolicy | None = None,
    seed: int = 0,
) -> dict:
    """Token-weighted log-ppl of the targets with ``⌊p·L⌋`` chunks expanded per window, chosen
    by ``selector`` (one of :data:`SELECTORS`), with the context positions the decoder read
    (``positions``) against the context's decoder tokens (``full_positions``), both summed."""
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; selectors: {', '.join(SELECTORS)}")
    if selector == "refrag_rl" and policy is None:
        raise ValueError("refrag_rl needs a policy")
    model.eval()
    rng = random.Random(seed)
    total_nll, total_count, positions, full = 0.0, 0, 0, 0
    for row in windows:
        embeds = chunk_embeddings(model, tok, row)
        m = expand_count(len(embeds), p)
        if selector == "refrag_random":
            chosen = random_selection(len(embeds), p, rng)
        elif selector == "refrag_heuristic":
            chosen = top_selection(chunk_surprise(model, tok, row), m)
        else:
            chosen = top_selection(policy.to(embeds.device)(embeds[None])[0], m)
        nll, count, pos = selection_nll(model, tok, row, [chosen], embeds)
        total_nll += float(nll[0])
        total_count += int(count[0])
        positions += pos[0]
        full += len(row["context_ids"])
    return {
        "variant": selector,
        "p": p,
        "log_ppl": total_nll / total_count,
        "n_windows": len(windows),
        "n_tokens": total_count,
        "positions": positions,
        "full_positions": full,
        "effective_compression": full / positions,
    }
