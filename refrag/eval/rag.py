"""Retrieval-augmented QA at equal latency, and retrieval recall.

The QA set's questions (:mod:`refrag.data.qa`: cloze sentences of held-out passages) are the
queries; a :class:`~refrag.retrieval.PassageIndex` of the whole corpus (every split) returns
the top passages. Two measures:

- **recall@n** (:func:`retrieval_hits`, :func:`recall_table`): ``recall_document`` is the
  share of questions whose top n passages hold a passage of the question's source document;
  ``recall_answer`` the share whose top n hold a passage of the source document that contains
  the answer (normalized text containment, :func:`refrag.data.qa.normalize_answer`). The query
  is the question's sentence with its blank, so it shares most words with its source: an easy
  retrieval task, stated as such.
- **RAG answers** (:func:`evaluate_rag`): each question's top n passages joined into one
  passage (in rank order, blank lines between) and answered exactly as
  :mod:`refrag.eval.qa` answers a passage (same prompt, greedy open answer scored SQuAD-style,
  multiple choice by likelihood, :mod:`refrag.eval.choice`), by **one** REFRAG checkpoint
  reading them as decoder tokens (``full_context``) or as chunk embeddings (``refrag``), and
  with no passage (``no_context``). Its **TTFT** per variant and n is measured in the same job
  on the same machine (:func:`measure_ttft`: the prompt's prefill, batch 1, chunk embeddings
  recomputed, median over questions × repeats, the configurations interleaved), so
  ``refrag`` at the most passages whose TTFT fits a ``full_context`` row's TTFT is the
  equal-latency comparison (:func:`equal_latency`).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from refrag.data.qa import QAExample, normalize_answer, question_prompt, read_qa_set  # noqa: E402
from refrag.eval.qa import answer_questions, qa_table  # noqa: E402
from refrag.eval.statistics import bootstrap_ratio  # noqa: E402
from refrag.eval.tables import compact, with_interval  # noqa: E402
from refrag.io.integrity import verify_folder, write_json  # noqa: E402
from refrag.io.runtime import pick_device  # noqa: E402
from refrag.modeling import RefragModel  # noqa: E402
from refrag.modeling.prompting import render_chat, template_tokenizer  # noqa: E402
from refrag.modeling.tokenization import RefragTokenizer  # noqa: E402
from refrag.retrieval import Passage, PassageIndex  # noqa: E402

PASSAGE_SEPARATOR = "\n\n"


def source_document(example: QAExample) -> str:
    """The document a question was cut from (its passage id is ``<doc_id>#<window>``)."""
    return example.passage_id.rsplit("#", 1)[0]


def retrieval_hits(
    index: PassageIndex, examples: list[QAExample], n: int
) -> tuple[list[list[Passage]], list[dict]]:
    """The top ``n`` passages of each question, and per question the 1-based rank of the
    first passage of its source document (``rank_document``) and of the first such passage
    containing the answer (``rank_answer``), None when not in the top ``n``."""
    hits = index.search_many([e.question for e in examples], n)
    rows = []
    for example, top in zip(examples, hits, strict=True):
        doc, answer = source_document(example), normalize_answer(example.answer)
        in_doc = [i for i, p in enumerate(top, 1) if p.doc_id == doc]
        with_answer = [i for i in in_doc if answer in normalize_answer(top[i - 1].text)]
        rows.append(
            {
                "id": example.id,
                "document": doc,
                "rank_document": in_doc[0] if in_doc else None,
                "rank_answer": with_answer[0] if with_answer else None,
            }
        )
    return hits, rows


def recall_table(
    rows: list[dict], ns: list[int], *, samples: int = 1000, seed: int = 0, level: float = 0.95
) -> pd.DataFrame:
    """recall@n for each n of ``ns`` (both definitions) from :func:`retrieval_hits` rows,
    with ``level`` intervals by bootstrap over the source documents."""
    frame = pd.DataFrame(rows)
    docs = sorted(frame["document"].unique())
    counts = frame.groupby("document").size().reindex(docs).to_numpy(float)
    tails = [(1 - level) / 2, (1 + level) / 2]
    out = []
    for n in ns:
        row = {"n": n}
        for name in ("document", "answer"):
            ranks = frame[f"rank_{name}"]
            hit = (ranks.notna() & (ranks.fillna(n + 1) <= n)).astype(float)
            sums = hit.groupby(frame["document"]).sum().reindex(docs).to_numpy(float)
            draws = bootstrap_ratio(sums[None], counts[None], samples, seed)[:, 0]
            lo, hi = np.quantile(draws, tails)
            row |= {f"recall_{name}": sums.sum() / counts.sum(), f"recall_{name}_lo": lo}
            row[f"recall_{name}_hi"] = hi
        out.append(row | {"n_questions": len(frame), "n_documents": len(docs)})
    return pd.DataFrame(out)


def with_passages(examples: list[QAExample], hits: list[list[Passage]], n: int) -> list[QAExample]:
    """Each question with its top ``n`` retrieved passages as its passage (id unchanged, so
    the bootstrap still groups by the source document)."""
    return [
        replace(e, passage=PASSAGE_SEPARATOR.join(p.text for p in top[:n]))
        for e, top in zip(examples, hits, strict=True)
    ]


@torch.no_grad()
def measure_ttft(
    model, tok: RefragTokenizer, configs: dict[tuple[str, int], list[QAExample]], repeats: int
) -> dict[tuple[str, int], dict]:
    """Time to first token of each (variant, n)'s prompts: one prefill (batch 1, chunk
    embeddings recomputed) to the first token's logits, in milliseconds; median, min and
    positions over each config's examples × ``repeats``, the configurations interleaved
    so that load on the machine falls on all of them alike."""
    tok = template_tokenizer(tok)
    device = next(model.parameters()).device
    prepared = {
        key: [
            {
                k: v.to(device)
                for k, v in tok(
                    render_chat(
                        tok.decoder_tokenizer,
                        [{"role": "user", "content": question_prompt(e, key[0])}],
                    )
                ).items()
                if k != "labels"
            }
            for e in examples
        ]
        for key, examples in configs.items()
    }
    times: dict[tuple[str, int], list[float]] = {key: [] for key in configs}
    for batches in prepared.values():  # warm-up, untimed
        model(**batches[0], use_cache=True)
    for _ in tqdm(range(repeats), desc="ttft", mininterval=5):
        for key, batches in prepared.items():
            for batch in batches:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                logits = model(**batch, use_cache=True).logits
                logits[0, -1].argmax().item()  # the first token, on the host
                times[key].append(1000 * (time.perf_counter() - start))
    return {
        key: {
            "ttft_ms": statistics.median(ms),
            "ttft_min_ms": min(ms),
            "timings": len(ms),
            "positions": statistics.mean(b["input_ids"].shape[1] for b in prepared[key]),
        }
        for key, ms in times.items()
    }


def evaluate_rag(
    *,
    index: str | os.PathLike,
    qa_set: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    recall_n: list[int],
    tokens_n: list[int],
    refrag_n: list[int],
    questions: int,
    ttft_questions: int = 4,
    ttft_repeats: int = 3,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    encoder: str | os.PathLike | None = None,
    labels: dict | None = None,
) -> dict:
    """Recall@``recall_n`` over every question of ``qa_set``; then, on its first
    ``questions`` questions, RAG answers by the REFRAG ``checkpoint``: no passage, the top n
    passages as tokens for n in ``tokens_n`` and as chunk embeddings for n in ``refrag_n``,
    each with its TTFT (:func:`measure_ttft` on the first ``ttft_questions``). Writes and
    returns ``{"recall": rows, "answers": rows, "ttft": rows, "run": …}``."""
    examples = read_qa_set(qa_set)
    passage_index = PassageIndex.load(index, encoder)
    hits, recall = retrieval_hits(passage_index, examples, max([*recall_n, *tokens_n, *refrag_n]))
    print(f"retrieved for {len(examples)} questions from {len(passage_index)} passages")
    verify_folder(checkpoint)
    model = RefragModel.from_pretrained(checkpoint).to(pick_device()).eval()
    model.chunk_cache = None  # TTFT with chunk embeddings recomputed, for every prompt
    tok = RefragTokenizer.from_pretrained(checkpoint)
    log = Path(checkpoint, "training_log.json")
    stage = json.loads(log.read_text())["stage"] if log.is_file() else None
    run = {"k": model.config.compression, "stage": stage} | (labels or {})
    asked, asked_hits = examples[:questions], hits[:questions]
    configs = {("no_context", 0): asked}
    configs |= {("full_context", n): with_passages(asked, asked_hits, n) for n in tokens_n}
    configs |= {("refrag", n): with_passages(asked, asked_hits, n) for n in refrag_n}
    ttft = measure_ttft(
        model, tok, {key: ex[:ttft_questions] for key, ex in configs.items()}, ttft_repeats
    )
    answers, ttft_rows = [], []
    for (variant, n), examples_n in configs.items():
        answered = answer_questions(
            model, tok, examples_n, variant, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        extra = {"n": n, "ttft_ms": ttft[variant, n]["ttft_ms"]} | run
        answers += [r | extra for r in answered]
        ttft_rows.append({"variant": variant, "n": n} | ttft[variant, n] | run)
        print(
            f"{variant} n={n}: exact match "
            f"{statistics.mean(r['exact_match'] for r in answered):.3f}, "
            f"TTFT {ttft[variant, n]['ttft_ms']:.1f} ms"
        )
    result = {
        "recall": [r | (labels or {}) for r in recall],
        "answers": answers,
        "ttft": ttft_rows,
        "run": run
        | {
            "device": str(next(model.parameters()).device),
            "threads": torch.get_num_threads(),
            "index_passages": len(passage_index),
            "index_documents": passage_index.meta["documents"],
        },
    }
    write_json(out, result)
    return result


def rag_table(result: dict, *, samples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per variant and n: the QA scores of :func:`refrag.eval.qa.qa_table` (95%
    intervals by bootstrap over documents, the same resamples for every row) with ``n``,
    ``ttft_ms`` and ``positions``; ``choice_gain`` against ``no_context`` read by the same
    checkpoint."""
    frame = pd.DataFrame(result["answers"])
    ttft = {(r["variant"], r["n"]): r for r in result["ttft"]}
    parts = []
    for n in sorted(frame["n"].unique()):
        rows = frame[(frame["n"] == n) | (frame["variant"] == "no_context")].copy()
        # qa_table's gain reference is the key (no_context, k None, sft False): the no-passage
        # row here is the same checkpoint's, passed under that key and relabelled below
        reference = rows["variant"] == "no_context"
        rows["k"] = rows["k"].astype(object).where(~reference, None)
        rows["sft"] = ~reference
        table = qa_table(rows.to_dict("records"), samples=samples, seed=seed)
        table = table[(table["variant"] != "no_context") | (n == 0)].copy()
        table["n"] = int(n)
        parts.append(table)
    table = pd.concat(parts, ignore_index=True)
    run = result["run"]
    table["k"] = run["k"]
    table["stage"] = run["stage"]
    table = table.drop(columns=["sft", "p"])  # RAG asks no refrag_rl
    table["ttft_ms"] = [ttft[v, n]["ttft_ms"] for v, n in zip(table["variant"], table["n"])]
    table["positions"] = [ttft[v, n]["positions"] for v, n in zip(table["variant"], table["n"])]
    table["device"] = run["device"]
    first = ["variant", "n", "k", "stage", "ttft_ms", "positions"]
    return table[first + [c for c in table.columns if c not in first]]


def equal_latency(table: pd.DataFrame) -> pd.DataFrame:
    """For each ``full_context`` row: the ``refrag`` row with the most passages whose
    measured TTFT is at most that row's (none when even one passage is slower)."""
    tokens = table[table["variant"] == "full_context"]
    refrag = table[table["variant"] == "refrag"]
    out = []
    for _, row in tokens.iterrows():
        fit = refrag[refrag["ttft_ms"] <= row["ttft_ms"]]
        best = fit.loc[fit["n"].idxmax()] if len(fit) else None
        out.append(
            {
                "tokens_n": row["n"],
                "tokens_ttft_ms": row["ttft_ms"],
                "tokens_exact_match": row["exact_match"],
                "tokens_choice_accuracy": row["choice_accuracy"],
                "refrag_n": None if best is None else best["n"],
                "refrag_ttft_ms": None if best is None else best["ttft_ms"],
                "refrag_exact_match": None if best is None else best["exact_match"],
                "refrag_choice_accuracy": None if best is None else best["choice_accuracy"],
            }
        )
    return pd.DataFrame(out)


STYLES = {
    "full_context": ("tab:green", "o", "passages as tokens"),
    "refrag": ("tab:blue", "s", "REFRAG"),
}

RAG_CAPTION = (
    "RAG on the QA set's questions: each question's top n retrieved passages (joined in rank "
    "order) read by one checkpoint (stage and k given) as tokens (full_context) or as chunk "
    "embeddings (refrag), or no passage (no_context, n 0); scored as the QA table scores. "
    "ttft_ms: time to first token measured in the same job on this machine (prefill, batch 1, "
    "chunk embeddings recomputed, median); positions: decoder positions of the prompt. "
    "[*_lo, *_hi]: 95% bootstrap interval over documents; choice_gain: against no_context."
)
RECALL_CAPTION = (
    "Retrieval recall@n over every question of the QA set (query: the question's sentence "
    "with its blank, so it shares most words with its source: an easy task). recall_document: "
    "a passage of the question's source document in the top n; recall_answer: one of them "
    "also contains the answer. The index holds the documents of the splits retrieval.splits "
    "lists (index_documents, index_passages)."
)
EQUAL_CAPTION = (
    "Equal latency: for each number of passages read as tokens, REFRAG with the most "
    "passages whose measured TTFT is not above it."
)


def plot_rag(rag_csv: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Multiple-choice accuracy and exact match against passages read and against measured
    TTFT, tokens vs REFRAG, one figure (``no_context`` as a dashed line)."""
    table = pd.read_csv(rag_csv)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey="row")
    for row, metric in enumerate(("choice_accuracy", "exact_match")):
        for col, x in enumerate(("n", "ttft_ms")):
            ax = axes[row, col]
            for variant, (colour, marker, label) in STYLES.items():
                part = table[table["variant"] == variant].sort_values("n")
                if part.empty:
                    continue
                err = [part[metric] - part[f"{metric}_lo"], part[f"{metric}_hi"] - part[metric]]
                ax.errorbar(
                    part[x],
                    part[metric],
                    yerr=err,
                    color=colour,
                    marker=marker,
                    capsize=3,
                    label=label,
                )
                for _, r in part.iterrows():
                    ax.annotate(
                        f"{r['n']}",
                        (r[x], r[metric]),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=8,
                        color=colour,
                    )
            for _, r in table[table["variant"] == "no_context"].iterrows():
                ax.axhline(r[metric], ls="--", color="tab:red", label="no passage")
            ax.set_xlabel("retrieved passages read" if x == "n" else "TTFT (ms, measured)")
            ax.set_ylabel(metric.replace("_", " "))
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    first = table.iloc[0]
    fig.suptitle(
        f"RAG at equal latency: {first.get('stage', '')} checkpoint, k = {first['k']}, "
        f"{int(first['n_questions'])} questions, device {first.get('device', '?')}"
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def report_sections(
    rag_csv: str | os.PathLike, recall_csv: str | os.PathLike, equal_csv: str | os.PathLike
) -> list[tuple[str, str, pd.DataFrame]]:
    """The report's retrieval sections: (title, caption, table) for recall@n, the RAG table
    and the equal-latency pairs, numbers as the report prints them."""
    recall = pd.read_csv(recall_csv)
    for name in ("document", "answer"):
        recall[f"recall_{name}"] = [
            with_interval(*t)
            for t in zip(
                recall[f"recall_{name}"],
                recall[f"recall_{name}_lo"],
                recall[f"recall_{name}_hi"],
                strict=True,
            )
        ]
        recall = recall.drop(columns=[f"recall_{name}_lo", f"recall_{name}_hi"])
    rag = pd.read_csv(rag_csv)
    keep = [
        "variant",
        "n",
        "k",
        "stage",
        "ttft_ms",
        "positions",
        "exact_match",
        "exact_match_lo",
        "exact_match_hi",
        "f1",
        "f1_lo",
        "f1_hi",
        "choice_accuracy",
        "choice_accuracy_lo",
        "choice_accuracy_hi",
        "choice_gain",
        "choice_gain_lo",
        "choice_gain_hi",
        "n_questions",
        "n_documents",
        "eval_set",
    ]
    return [
        ("Retrieval recall@n", RECALL_CAPTION, compact(recall)),
        ("RAG answers by passages read", RAG_CAPTION, compact(rag[[c for c in keep if c in rag]])),
        ("RAG at equal latency", EQUAL_CAPTION, compact(pd.read_csv(equal_csv))),
    ]
