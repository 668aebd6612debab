"""Multiple-choice QA scored by likelihood, as the paper scores its multiple-choice RAG tasks.

Each question of the QA set carries candidate answers (:func:`refrag.data.qa.add_choices`:
the gold span and distractors of the same kind from other documents, none of them in the
passage, so that the passage decides between them). A model reads the question's prompt
exactly as the open-answer evaluation asks it (:func:`refrag.data.qa.question_prompt`, in
the decoder's chat template, the passage as nothing, as tokens or as chunk embeddings), and
each candidate is scored by its **mean log-likelihood per token** as the assistant's reply
(length-normalized, the same for every row, so a short candidate has no edge for being
short). The pick is the candidate with the highest score; ties go to the first listed
(candidates are stored in a seeded random order, so the gold is not first by construction).

The prompt is read once, by the open answer's generation
(:func:`refrag.eval.qa.answer_questions`): :func:`cached_candidate_scores` scores every
candidate of a left-padded batch of prompts from that pass's KV cache and last logits, in one
short decoder pass over all the batch's candidates.
"""

from __future__ import annotations

import torch

from refrag.data.qa import QAExample
from refrag.modeling.tokenization import RefragTokenizer


@torch.no_grad()
def cached_candidate_scores(
    decoder,
    tok: RefragTokenizer,
    examples: list[QAExample],
    attention_mask: torch.Tensor,
    cache,
    last_logits: torch.Tensor,
) -> list[list[float] | None]:
    """Mean log-likelihood per token of each of ``examples[b].choices`` as the reply to
    prompt ``b`` of a left-padded batch (``attention_mask``, ``(B, L)``), given the decoder's
    KV cache of exactly those ``L`` positions and the logits of the last one (``(B, vocab)``).
    ``None`` for an example without candidates. The cache is consumed (rows repeated)."""
    rows = [
        (b, tok.decoder_tokenizer(c, add_special_tokens=False)["input_ids"])
        for b, example in enumerate(examples)
        for c in example.choices
    ]
    first = torch.log_softmax(last_logits.float(), -1)
    totals = [float(first[b, ids[0]]) for b, ids in rows]
    rest = max((len(ids) for _, ids in rows), default=1) - 1
    if rest > 0:  # every candidate's later tokens in one batch over its prompt's cache
        device = attention_mask.device
        index = torch.tensor([b for b, _ in rows], device=device)
        prompt = attention_mask[index]
        pad = tok.decoder_pad_token_id
        step = torch.tensor([ids[:-1] + [pad] * (rest + 1 - len(ids)) for _, ids in rows])
        mask = torch.tensor([[1] * (len(ids) - 1) + [0] * (rest + 1 - len(ids)) for _, ids in rows])
        cache.reorder_cache(index)
        logits = decoder(
            input_ids=step.to(device),
            attention_mask=torch.cat([prompt, mask.to(device)], 1),
            position_ids=prompt.sum(1, keepdim=True) + torch.arange(rest, device=device),
            past_key_values=cache,
            use_cache=False,
        ).logits
        logp = torch.log_softmax(logits.float(), -1)
        for i, (_, ids) in enumerate(rows):
            later = torch.tensor(ids[1:], device=device)
            totals[i] += float(logp[i, : len(later)].gather(1, later[:, None]).sum())
    scores: list[list[float] | None] = [[] if e.choices else None for e in examples]
    for (b, ids), total in zip(rows, totals):
        scores[b].append(total / len(ids))
    return scores


def choice_result(example: QAExample, scores: list[float] | None) -> dict:
    """``choice_scores``, ``choice`` (the picked candidate) and ``choice_correct`` (1.0 when it
    is the gold answer); empty for an example without candidates."""
    if scores is None:
        return {}
    pick = example.choices[max(range(len(scores)), key=lambda i: (scores[i], -i))]
    return {
        "choice_scores": scores,
        "choice": pick,
        "choice_correct": float(pick == example.answer),
    }
