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

The prompt is read once; the candidates' tokens are then one short batched decoder pass
over the prompt's KV cache (repeated once per candidate).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from refrag.data.qa import QAExample, question_prompt
from refrag.modeling.prompting import render_chat, template_tokenizer
from refrag.modeling.tokenization import RefragTokenizer


@torch.no_grad()
def candidate_scores(model, tok: RefragTokenizer, example: QAExample, variant: str) -> list[float]:
    """Mean log-likelihood per token of each of ``example.choices`` as the reply to the
    question's prompt read as ``variant``. ``tok`` must already be the template tokenizer
    (:func:`refrag.modeling.prompting.template_tokenizer`)."""
    is_refrag = hasattr(model, "embed_inputs")
    decoder = model.decoder if is_refrag else model
    device = next(model.parameters()).device
    text = render_chat(
        tok.decoder_tokenizer, [{"role": "user", "content": question_prompt(example, variant)}]
    )
    batch = {k: v.to(device) for k, v in tok(text).items() if k != "labels"}
    if is_refrag:  # the last position's logits only: the vocabulary over the prompt is waste
        out = model(**batch, use_cache=True, logits_to_keep=1)
    else:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            use_cache=True,
            logits_to_keep=1,
        )
    cache, first = out.past_key_values, torch.log_softmax(out.logits[0, -1].float(), -1)
    length = batch["input_ids"].shape[1]
    ids = [tok.decoder_tokenizer(c, add_special_tokens=False)["input_ids"] for c in example.choices]
    totals = [float(first[row[0]]) for row in ids]
    rest = max(len(row) for row in ids) - 1
    if rest > 0:  # every candidate's later tokens in one batch over the prompt's cache
        n, pad = len(ids), tok.decoder_pad_token_id
        step = torch.tensor(
            [row[:-1] + [pad] * (rest + 1 - len(row)) for row in ids], device=device
        )
        mask = torch.tensor([[1] * (len(row) - 1) + [0] * (rest + 1 - len(row)) for row in ids])
        mask = torch.cat([torch.ones(n, length, dtype=torch.long), mask], 1).to(device)
        cache.batch_repeat_interleave(n)
        logits = decoder(
            input_ids=step, attention_mask=mask, past_key_values=cache, use_cache=False
        ).logits
        logp = torch.log_softmax(logits.float(), -1)
        for i, row in enumerate(ids):
            totals[i] += float(sum(logp[i, j, t] for j, t in enumerate(row[1:])))
    return [total / len(row) for total, row in zip(totals, ids)]


def score_choices(model, tok: RefragTokenizer, examples: list[QAExample], variant: str):
    """Per example: ``choice_scores`` (one per candidate), ``choice`` (the picked candidate)
    and ``choice_correct`` (1.0 when it is the gold answer). Examples without candidates get
    none of these."""
    tok = template_tokenizer(tok)
    results = []
    for example in tqdm(examples, desc=f"{variant} choices", mininterval=5):
        if not example.choices:
            results.append({})
            continue
        scores = candidate_scores(model, tok, example, variant)
        pick = example.choices[max(range(len(scores)), key=lambda i: (scores[i], -i))]
        results.append(
            {
                "choice_scores": scores,
                "choice": pick,
                "choice_correct": float(pick == example.answer),
            }
        )
    return results
