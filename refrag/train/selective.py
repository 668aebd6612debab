"""The selective-compression stages: ``mixed`` (continual pretraining on random mixed
inputs) and ``policy`` (REINFORCE of a :class:`~refrag.modeling.ChunkPolicy`); the method is
described in :mod:`refrag.eval.selective`."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import Trainer

from refrag.data.mixed import chunk_spans, expand_count, mixed_parts, random_selection
from refrag.data.shards import read_shards
from refrag.eval.selective import chunk_embeddings, selection_nll
from refrag.modeling.tokenization import RefragTokenizer
from refrag.train.datasets import ExampleDataset, shuffled_cycle


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
    p ~ U[0, hp.max_expand_fraction] (train with ``refrag.train.trainers:causal_lm_trainer``)."""
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


def rewards(model, tok, row, selections, embeds) -> torch.Tensor:
    """Reward of each selection: −log-ppl (minus the mean NLL per target token)."""
    nll, count, _ = selection_nll(model, tok, row, selections, embeds)
    return -(nll / count)


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
