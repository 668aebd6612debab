"""Question answering scored SQuAD-style, for the three ways of reading the passage.

Scoring follows SQuAD v1.1: answers are normalized (lower case, punctuation and articles
removed, whitespace collapsed); exact match is 1 when the normalized strings are equal, F1
is the bag-of-tokens overlap. :func:`answer_questions` generates an answer greedily for each
question of a QA set (:mod:`refrag.data.qa`; read from the generation by
:func:`cloze_answer`), with the passage read as nothing (``no_context``), as decoder tokens
(``full_context``), as chunk embeddings in a ``<doc>`` (``refrag``) or as chunk embeddings
with the top fraction ``p`` of the chunks by the model's chunk policy read as tokens
(``refrag_rl``, :func:`refrag.eval.selective.policy_batch`), through the decoder's chat
template as ``refrag chat`` renders it.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from refrag.data.qa import (
    BLANK,
    VARIANTS,
    QAExample,
    normalize_answer,
    question_prompt,
    read_qa_set,
)
from refrag.eval.choice import cached_candidate_scores, choice_result
from refrag.eval.selective import policy_batch
from refrag.eval.statistics import bootstrap_ratio
from refrag.eval.tables import QA_COLUMNS, ordered, write_rows
from refrag.io.integrity import verify_folder
from refrag.io.runtime import pick_device
from refrag.modeling import RefragModel
from refrag.modeling.modeling_refrag import load_pretrained
from refrag.modeling.prompting import render_chat, template_tokenizer
from refrag.modeling.tokenization import RefragTokenizer

# -- SQuAD v1.1 scoring -------------------------------------------------------------------


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def f1_score(prediction: str, answer: str) -> float:
    """Token-overlap F1 of the normalized strings (1 when both are empty)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


METRICS = {"exact_match": "exact_match", "f1": "f1", "choice_accuracy": "choice_correct"}
# the gains' reference row (variant, k, sft, p): the base decoder, no passage
REFERENCE = ("no_context", None, False, None)


def qa_table(rows: list[dict], *, samples: int = 1000, seed: int = 0, level: float = 0.95):
    """Per-question rows (:func:`evaluate_qa`) → one row per decoder, encoder, eval set,
    variant, k, SFT and p (``refrag_rl``'s fraction; empty for the others): ``exact_match``,
    ``f1`` (open answers) and ``choice_accuracy``
    (multiple choice, over the questions with candidates), means over questions, each with
    ``*_lo``/``*_hi``, a ``level`` percentile interval by bootstrap over documents (the rows
    of a decoder, encoder and eval set resampled together, so their differences are paired);
    ``choice_gain`` = the row's ``choice_accuracy`` minus that of the base decoder without
    the passage (``no_context``, no SFT), with its paired interval; ``n_questions``,
    ``n_choice_questions`` and ``n_documents``. Raises ``ValueError`` where rows of one group
    answered different questions."""
    frame = pd.DataFrame(rows)
    if "choice_correct" not in frame:
        frame["choice_correct"] = np.nan
    if "p" not in frame:
        frame["p"] = np.nan
    frame["document"] = frame["passage_id"].str.rsplit("#", n=1).str[0]
    frame["row"] = [
        (v, None if pd.isna(k) else int(k), bool(sft), None if pd.isna(p) else float(p))
        for v, k, sft, p in zip(frame["variant"], frame["k"], frame["sft"], frame["p"])
    ]
    frame["choice_asked"] = frame["choice_correct"].notna().astype(float)
    frame["choice_correct"] = frame["choice_correct"].fillna(0.0)
    frame["asked"] = 1.0
    group, tails = ["decoder", "encoder", "eval_set"], [(1 - level) / 2, (1 + level) / 2]
    out = []
    for key, part in frame.groupby(group):
        asked = part.groupby("row", sort=False)["id"].apply(frozenset)
        if asked.nunique() > 1:
            sizes = ", ".join(f"{r}: {len(q)} questions" for r, q in asked.items())
            raise ValueError(
                f"QA rows of {dict(zip(group, key))} answered different questions ({sizes}); "
                "rerun their evaluation on the same QA set"
            )
        docs = sorted(part["document"].unique())
        per_doc = part.groupby(["row", "document"], sort=False)

        def doc_sums(column, per_doc=per_doc, docs=docs):
            return per_doc[column].sum().unstack(fill_value=0).reindex(columns=docs, fill_value=0)

        counts = doc_sums("asked")
        choice_counts = doc_sums("choice_asked").reindex(counts.index)
        result = {
            "n_questions": counts.sum(axis=1).astype(int),
            "n_choice_questions": choice_counts.sum(axis=1).astype(int),
            "n_documents": len(docs),
        }
        for metric, column in METRICS.items():
            count = choice_counts if metric == "choice_accuracy" else counts
            sums = doc_sums(column).reindex(count.index)
            with np.errstate(invalid="ignore", divide="ignore"):
                draws = bootstrap_ratio(sums.to_numpy(), count.to_numpy(), samples, seed)
                lo, hi = np.nanquantile(draws, tails, 0)
                result |= {
                    metric: sums.sum(axis=1) / count.sum(axis=1),
                    f"{metric}_lo": pd.Series(lo, count.index),
                    f"{metric}_hi": pd.Series(hi, count.index),
                }
            if metric == "choice_accuracy" and REFERENCE in count.index:
                ref = list(count.index).index(REFERENCE)
                gains = draws - draws[:, [ref]]
                lo, hi = np.nanquantile(gains, tails, 0)
                point = result[metric] - result[metric][REFERENCE]
                result |= {
                    "choice_gain": point,
                    "choice_gain_lo": pd.Series(lo, count.index),
                    "choice_gain_hi": pd.Series(hi, count.index),
                }
        for row in counts.index:
            variant, k, sft, p = row
            values = {name: v if np.isscalar(v) else v[row] for name, v in result.items()}
            labels = {"variant": variant, "k": k, "sft": sft, "p": p}
            out.append(dict(zip(group, key)) | labels | values)
    table = pd.DataFrame(out)
    table["k"] = table["k"].astype("Int64")
    table["p"] = table["p"].astype(float)
    table["order"] = table["variant"].map({v: i for i, v in enumerate(VARIANTS)})
    table = table.sort_values([*group, "sft", "order", "k", "p"]).drop(columns="order")
    return ordered(table, QA_COLUMNS).reset_index(drop=True)


def cloze_answer(generation: str, question: str) -> str:
    """What counts as the answer in a generation: its first non-empty line; where that line
    restates the question's sentence up to the blank, the words after that restated part, up
    to the first word that follows the blank in the question (small models often answer a
    cloze by rewriting the sentence with the blank filled)."""
    line = next((ln.strip() for ln in generation.splitlines() if ln.strip()), "")
    before, _, after = (" ".join(part.split()) for part in question.partition(BLANK))
    flat = " ".join(line.split())
    if not before or not flat.startswith(before):
        return line
    rest = flat[len(before) :]
    stop = after.split()[0] if after.split() else ""
    edge = r"(?<!\w)" if stop[:1].isalnum() else ""  # a word stop never matches mid-word
    match = re.search(edge + re.escape(stop), rest) if stop else None
    return (rest[: match.start()] if match else rest).strip()


@torch.no_grad()
def answer_questions(
    model,
    tok: RefragTokenizer,
    examples: list[QAExample],
    variant: str,
    *,
    p: float | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 8,
) -> list[dict]:
    """Generate a short answer greedily for each example and score it; score its candidate
    answers (:mod:`refrag.eval.choice`) from the same reading of the prompt.

    ``model`` is a ``RefragModel`` (every variant; ``refrag_rl``: one with a chunk policy,
    expanding the fraction ``p``) or a plain causal LM (``no_context`` and ``full_context``).
    Returns one dict per example: its fields, ``p``, ``prediction``, ``exact_match`` and
    ``f1``, where it has candidates ``choice_scores``, ``choice`` and ``choice_correct``, and
    for ``refrag_rl`` the decoder ``positions`` the passage took.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    is_refrag = hasattr(model, "embed_inputs")
    if variant in ("refrag", "refrag_rl") and not is_refrag:
        raise ValueError(f"the {variant} variant needs a RefragModel")
    if variant == "refrag_rl" and p is None:
        raise ValueError("the refrag_rl variant needs p, the fraction of chunks to expand")
    if variant == "refrag_rl" and getattr(model, "policy", None) is None:
        raise ValueError("refrag_rl needs a model with a chunk policy (of the policy stage)")
    if variant != "refrag_rl":
        p = None
    tok = template_tokenizer(tok)
    device = next(model.parameters()).device
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": tok.decoder_pad_token_id,
        "eos_token_id": tok.decoder_tokenizer.eos_token_id,
        "return_dict_in_generate": True,  # its KV cache and first logits score the candidates
        "output_logits": True,
    }
    rows = []
    desc = variant if p is None else f"{variant} p={p:g}"
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, mininterval=5):
        part = examples[i : i + batch_size]
        texts = [
            render_chat(
                tok.decoder_tokenizer, [{"role": "user", "content": question_prompt(e, variant)}]
            )
            for e in part
        ]
        positions: list[int | None] = [None] * len(part)
        if variant == "refrag_rl":
            batch, positions = policy_batch(model, tok, texts, p, padding_side="left")
        else:
            batch = tok(texts, padding_side="left")
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        length = inputs["input_ids"].shape[1]
        if is_refrag:
            out = model.generate(**inputs, **kwargs)
            new = out.sequences
        else:
            out = model.generate(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs
            )
            new = out.sequences[:, length:]
        cache = out.past_key_values
        cache.crop(length - cache.get_seq_length())  # the prompt's positions only
        scores = cached_candidate_scores(
            model.decoder if is_refrag else model,
            tok,
            part,
            inputs["attention_mask"],
            cache,
            out.logits[0],
        )
        for example, ids, choices, used in zip(part, new.tolist(), scores, positions):
            prediction = cloze_answer(tok.decode(ids, skip_special_tokens=True), example.question)
            rows.append(
                asdict(example)
                | {
                    "variant": variant,
                    "p": p,
                    "prediction": prediction,
                    "exact_match": exact_match(prediction, example.answer),
                    "f1": f1_score(prediction, example.answer),
                }
                | choice_result(example, choices)
                | ({} if used is None else {"positions": used})
            )
    return rows


def evaluate_qa(
    *,
    qa_set: str | os.PathLike,
    out: str | os.PathLike,
    variants: Iterable[str] = ("no_context", "full_context", "refrag"),
    fractions: Sequence[float] = (),
    checkpoint: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    decoder: str | os.PathLike | None = None,
    labels: dict | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    sft: bool = False,
) -> list[dict]:
    """Answer the questions of ``qa_set`` (:func:`write_qa_set`) with a REFRAG
    ``checkpoint`` (``k`` read from it; ``sft``: the caller says whether its stage fine-tuned
    it for QA), or with the base ``decoder`` (``encoder`` only supplies the tokenizer pair; no
    SFT), reading the passage as each of ``variants`` (``refrag_rl``: at each p of
    ``fractions``, with a policy stage's checkpoint). Writes and returns one row per question,
    variant and p (:func:`answer_questions`, with ``labels``)."""
    variants = list(variants)
    if "refrag_rl" in variants and not fractions:
        raise ValueError("the refrag_rl variant needs fractions (the p values to expand)")
    examples = read_qa_set(qa_set)
    if checkpoint is not None:
        verify_folder(checkpoint)
        model = RefragModel.from_pretrained(checkpoint)
        tok = RefragTokenizer.from_pretrained(checkpoint)
        stage = json.loads(Path(checkpoint, "training_log.json").read_text())["stage"]
        run = {"k": model.config.compression, "stage": stage, "sft": sft}
    else:
        model = load_pretrained(AutoModelForCausalLM, decoder)
        tok = RefragTokenizer.from_encoder_decoder_pretrained(
            encoder_name_or_path=encoder, decoder_name_or_path=decoder
        )
        run = {"k": None, "stage": None, "sft": False}
    model.to(pick_device()).eval()
    rows = []
    readings = [
        (variant, p)
        for variant in variants
        for p in (fractions if variant == "refrag_rl" else [None])
    ]
    for variant, p in readings:
        answered = answer_questions(
            model,
            tok,
            examples,
            variant,
            p=p,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        rows += [row | run | (labels or {}) for row in answered]
        mean = sum(r["exact_match"] for r in answered) / max(len(answered), 1)
        picks = [r["choice_correct"] for r in answered if "choice_correct" in r]
        accuracy = sum(picks) / max(len(picks), 1)
        reading = variant if p is None else f"{variant} p={p:g}"
        print(
            f"{reading} {run}: exact match {mean:.3f} over {len(answered)} questions, "
            f"multiple-choice accuracy {accuracy:.3f} over {len(picks)}"
        )
    write_rows(rows, out)
    return rows
