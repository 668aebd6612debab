"""Selective compression: keep some chunks of the context as tokens, chosen by a policy.

A window's context is cut into L chunks of k encoder tokens (the rows the encoder reads).
A *mixed input* expands a chosen subset of them: an expanded chunk is its text (cut from
``context_text`` at the encoder tokens' character ends, ``context_encoder_ends``) tokenized
by the decoder; every other chunk stays one chunk embedding. The decoder reads
``Σ tokens(expanded) + #compressed`` context positions (:func:`mixed_parts`). At most a
fraction ``p`` is expanded: ``⌊p·L⌋`` chunks (:func:`expand_count`). Three ways to choose:

- ``refrag_random``: uniformly at random (also how the model is trained to read mixed
  inputs: :func:`mixed_dataset`, a fresh p ~ U[0, ``max_expand_fraction``] per example, as
  the paper trains with random p first);
- ``refrag_heuristic`` (perplexity heuristic): one decoder pass over the whole context as
  tokens gives each context token its NLL given the tokens before it; a chunk's score is the
  mean NLL of its tokens; the ``⌊p·L⌋`` chunks with the highest score are expanded (ties: the
  earlier chunk). Hard-to-predict text is what a chunk embedding is least likely to convey;
  this reads the full context once, so it is a reference, not a fast path;
- ``refrag_rl``: a small policy (:class:`~refrag.modeling.ChunkPolicy`: a 2-layer
  transformer over the chunk embeddings, one logit per chunk, held by the model as
  ``model.policy`` and saved with it) samples ``⌊p·L⌋`` distinct chunks without replacement
  (Gumbel-top-m, i.e. Plackett–Luce; padded chunks masked to −inf) and is trained with
  REINFORCE (:func:`reinforce_loss`): reward = −log-ppl of the window's continuation given
  the mixed input (the REFRAG model frozen), baseline = the mean reward of the other samples
  of the same window (leave-one-out), loss = −advantage · log π(selection). At evaluation the
  policy expands its top ``⌊p·L⌋`` logits.

Both trainings are stages of the registry (:mod:`refrag.stages`) and so run under
``train_stage`` (torchrun, resume): ``mixed`` (:func:`mixed_dataset` with
``refrag.training:causal_lm_trainer``, random p) and ``policy`` (:func:`policy_dataset` with
:func:`policy_trainer`, :class:`PolicyTrainer`: the Trainer's model is the policy alone, so
its checkpoints, DDP and optimizer hold only the policy; the stage's output folder is the
REFRAG model with its policy). :func:`evaluate_checkpoint` (the workflow's
``eval_selective``) writes a perplexity-table row per selector and p
(:func:`evaluate_selective`), scoring the same target tokens as every other row.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import Trainer

from refrag.evaluation import first_scored, result_row
from refrag.modeling import ChunkPolicy
from refrag.modeling.modeling_refrag import labelled_tail
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
    if not target:
        return parts
    skip, ids = first_scored(tok), list(row["target_ids"])  # as every evaluation row scores
    return [*parts, ("prompt", ids[:skip]), ("text", ids[skip:])]


def context_positions(example: dict, tok: RefragTokenizer) -> int:
    """Decoder positions an encoded mixed input spends on its context (no BOS, no target)."""
    return len(example["input_ids"]) - sum(example["label_mask"]) - (tok.bos_token_id is not None)


def random_selection(n_chunks: int, p: float, rng: random.Random) -> list[int]:
    """``⌊p·n⌋`` distinct chunks drawn uniformly."""
    return sorted(rng.sample(range(n_chunks), expand_count(n_chunks, p)))


def mixed_examples(
    windows: Sequence[dict],
    tok: RefragTokenizer,
    *,
    max_fraction: float,
    order: Sequence[int],
    seed: int,
    target_tokens: int | None = None,
) -> list[dict]:
    """One mixed input per index of ``order`` (into ``windows``), each expanding a random
    subset at a fresh p ~ U[0, max_fraction], trained on the first ``target_tokens`` targets
    (``None``: all)."""
    rng = random.Random(seed)
    examples = []
    for i in order:
        row = dict(windows[i])
        row["target_ids"] = list(row["target_ids"])[:target_tokens]
        n = len(chunk_spans(row, tok.compression))
        chosen = random_selection(n, rng.uniform(0, max_fraction), rng)
        examples.append(tok.encode_parts(mixed_parts(row, tok, chosen)))
    return examples


def mixed_dataset(data: str | os.PathLike, tok: RefragTokenizer, hp):
    """Registry-shaped ``(data, tok, hp) -> (dataset, collator)`` of the ``mixed`` stage:
    mixed continuation examples of all train windows in a random order, each at a random
    p ~ U[0, hp.max_expand_fraction] (train with ``refrag.training:causal_lm_trainer``)."""
    from refrag.data import read_shards
    from refrag.training import ExampleDataset, shuffled_cycle

    windows = read_shards(data).to_dict("records")
    total = hp.steps * hp.batch_size * hp.grad_accum
    examples = mixed_examples(
        windows,
        tok,
        max_fraction=hp.max_expand_fraction,
        order=shuffled_cycle(len(windows), total, hp.seed),
        seed=hp.seed,
        target_tokens=hp.target_tokens or None,
    )
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
    keep = labelled_tail(batch["labels"])  # only the positions that predict targets
    logits = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        chunk_mask=batch["chunk_mask"].to(device),
        chunk_embeds=kept,
        logits_to_keep=keep,
    ).logits
    labels = batch["labels"][:, -keep:][:, 1:].to(device)
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


# -- the policy, trained by REINFORCE on the Trainer --------------------------------------------
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


def reinforce_loss(
    logits: torch.Tensor,
    m: int,
    reward_fn: Callable[[list[list[int]]], torch.Tensor],
    *,
    samples: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE with a leave-one-out baseline for one context: draw ``samples`` selections of
    ``m`` chunks from ``logits`` (L,), score them with ``reward_fn``; returns the loss
    −mean((r − b)·log π) to minimize and the rewards."""
    if samples < 2:
        raise ValueError("a leave-one-out baseline needs samples >= 2")
    draws = [sample_selection(logits, m, generator) for _ in range(samples)]
    reward = reward_fn([selection for selection, _ in draws]).detach().float().to(logits.device)
    baseline = (reward.sum() - reward) / (samples - 1)
    log_probs = torch.stack([log_prob for _, log_prob in draws])
    return -((reward - baseline) * log_probs).mean(), reward


class WindowBatch:
    """Collator of the policy stage: shard rows as they are (the trainer encodes them)."""

    def __init__(self, tok: RefragTokenizer):
        self.tok = tok

    def __call__(self, rows: list[dict]) -> dict[str, list[dict]]:
        return {"windows": rows}


def policy_dataset(data: str | os.PathLike, tok: RefragTokenizer, hp):
    """Registry-shaped ``(data, tok, hp) -> (dataset, collator)``: all train shard rows in a
    random order, cycled to fill every step."""
    from refrag.data import read_shards
    from refrag.training import ExampleDataset, shuffled_cycle

    rows = read_shards(data).to_dict("records")
    total = hp.steps * hp.batch_size * hp.grad_accum
    order = shuffled_cycle(len(rows), total, hp.seed)
    return ExampleDataset([rows[i] for i in order]), WindowBatch(tok)


class PolicyTrainer(Trainer):
    """Trains ``model`` (a :class:`ChunkPolicy`, the REFRAG model's ``policy``) by REINFORCE
    (:func:`reinforce_loss`); the REFRAG model ``refrag`` is frozen and only scores. Logs the
    mean reward (−log-ppl) beside the loss."""

    def __init__(self, *args, refrag, tok: RefragTokenizer, p: float, samples: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.refrag = refrag.to(self.args.device).eval()
        refrag.set_trainable(encoder=False, projector=False, decoder=False)  # the policy trains
        self.tok, self.p, self.samples = tok, p, samples
        self._rewards: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs["windows"]
        embeds = [chunk_embeddings(self.refrag, self.tok, row) for row in rows]
        padded = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence(
            [torch.ones(len(e), dtype=torch.bool, device=e.device) for e in embeds],
            batch_first=True,
        )
        logits = model(padded, mask)  # one pass through the (DDP-wrapped) policy
        losses = []
        for row, chunk_embeds, row_logits in zip(rows, embeds, logits):
            m = expand_count(len(chunk_embeds), self.p)
            if m == 0:
                continue

            def reward_fn(selections, row=row, chunk_embeds=chunk_embeds):
                return rewards(self.refrag, self.tok, row, selections, chunk_embeds)

            # draws use torch's global RNG, which the Trainer's checkpoints save and restore
            loss, reward = reinforce_loss(row_logits, m, reward_fn, samples=self.samples)
            losses.append(loss)
            self._rewards.append(reward.mean().item())
        if not losses:  # no chunk to expand: a zero that still reaches every parameter
            return logits.masked_fill(~mask, 0).sum() * 0
        return torch.stack(losses).mean()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._rewards and "loss" in logs:
            logs["reward"] = sum(self._rewards) / len(self._rewards)
            self._rewards.clear()
        super().log(logs, start_time)


def policy_trainer(hp, **kwargs) -> PolicyTrainer:
    """Registry-shaped ``(hp, **trainer_kwargs) -> Trainer`` of the policy stage: gives the
    REFRAG ``model`` a fresh policy (kept if it has one) and trains only that, expanding a
    fraction ``hp.expand_fraction`` of the chunks with ``hp.policy_samples`` draws per window."""
    refrag = kwargs.pop("model")
    policy = refrag.policy if refrag.policy is not None else refrag.add_policy()
    return PolicyTrainer(
        model=policy,
        refrag=refrag,
        tok=kwargs["data_collator"].tok,
        p=hp.expand_fraction,
        samples=hp.policy_samples,
        **kwargs,
    )


# -- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def score_selective(
    model,
    tok: RefragTokenizer,
    windows: Sequence[dict],
    *,
    p: float,
    selector: str,
    policy: ChunkPolicy | None = None,
    seed: int = 0,
) -> list[dict]:
    """One :func:`refrag.evaluation.score_windows` record per window, with ``⌊p·L⌋`` of its
    chunks expanded, chosen by ``selector`` (one of :data:`SELECTORS`; ``refrag_rl``: the
    model's ``policy`` unless ``policy`` is given); ``positions`` are the decoder positions
    its context took."""
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; selectors: {', '.join(SELECTORS)}")
    policy = policy if policy is not None else getattr(model, "policy", None)
    if selector == "refrag_rl" and policy is None:
        raise ValueError("refrag_rl needs a policy (a model trained by the policy stage)")
    model.eval()
    rng, skip = random.Random(seed), first_scored(tok)
    records = []
    for row in tqdm(windows, desc=f"{selector} p={p}", mininterval=5):
        embeds = chunk_embeddings(model, tok, row)
        m = expand_count(len(embeds), p)
        if selector == "refrag_random":
            chosen = random_selection(len(embeds), p, rng)
        elif selector == "refrag_heuristic":
            chosen = top_selection(chunk_surprise(model, tok, row), m)
        else:
            chosen = top_selection(policy.to(embeds.device)(embeds[None])[0], m)
        nll, count, positions = selection_nll(model, tok, row, [chosen], embeds)
        scored = list(range(skip, len(row["target_ids"])))
        if int(count[0]) != len(scored):
            raise AssertionError(f"scored {int(count[0])} target tokens, expected {len(scored)}")
        records.append(
            {
                "doc_id": str(row["doc_id"]),
                "window": int(row["window"]),
                "nll": float(nll[0]),
                "tokens": len(scored),
                "scored": scored,
                "positions": positions[0],
                "context_tokens": len(row["context_ids"]),
            }
        )
    return records


def evaluate_selective(
    model,
    tok: RefragTokenizer,
    windows: Sequence[dict],
    *,
    p: float,
    selector: str,
    policy: ChunkPolicy | None = None,
    seed: int = 0,
    **labels,
) -> dict:
    """An evaluation result row (:func:`refrag.evaluation.result_row`: token-weighted
    log-ppl, mean ``positions``, ``compression`` = context tokens / positions, per-window
    sums for the bootstrap) of :func:`score_selective`, as variant ``selector`` at ``p``."""
    records = score_selective(model, tok, windows, p=p, selector=selector, policy=policy, seed=seed)
    return result_row(records, list(windows), variant=selector, p=p, **labels)


def evaluate_checkpoint(
    *,
    shards: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    fractions: Sequence[float],
    seed: int = 0,
    labels: dict | None = None,
) -> list[dict]:
    """Every selector of :data:`SELECTORS` at every fraction of ``fractions`` on a shard
    folder, with a policy stage's ``checkpoint`` (its mixed-input model and policy). Writes
    the JSON list of result rows (:func:`evaluate_selective`, stage and k from the
    checkpoint), which the perplexity table reads beside the other evaluations."""
    import json
    from pathlib import Path

    from refrag.data import read_shards
    from refrag.integrity import verify_folder
    from refrag.modeling import RefragModel
    from refrag.utils import pick_device

    verify_folder(checkpoint)
    model = RefragModel.from_pretrained(checkpoint).to(pick_device())
    tok = RefragTokenizer.from_pretrained(checkpoint)
    stage = json.loads(Path(checkpoint, "training_log.json").read_text())["stage"]
    windows = read_shards(shards).to_dict("records")
    rows = []
    for p in fractions:
        for selector in SELECTORS:
            row = evaluate_selective(
                model,
                tok,
                windows,
                p=p,
                selector=selector,
                seed=seed,
                k=model.config.compression,
                stage=stage,
                **(labels or {}),
            )
            rows.append(row)
            print({key: v for key, v in row.items() if key != "windows"})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows
