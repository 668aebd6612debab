"""The passage-grounded QA set: cloze questions built from held-out passages.

How the QA set is built (:func:`build_qa`), from passages of held-out documents (for the
evaluation: the test split's windows, never the training documents):

1. each passage is cut into sentences; its first and last sentence are skipped (a window may
   cut them), and so are sentences outside 8–60 words;
2. in each remaining sentence the candidate answer spans are numbers (``1837``, ``3,500``) and
   runs of capitalized words (``Charles Babbage``) that do not open the sentence, of at most
   four words, occurring exactly once in the sentence and leaving at least six other words;
3. per passage, up to ``per_passage`` (sentence, span) pairs are drawn with a random generator
   seeded by ``(seed, passage id)``, so a passage gives the same questions whatever else is in
   the set; the question is the sentence with the span replaced by a blank, the answer is the
   span;
4. questions whose normalized text repeats an earlier one are dropped;
5. with ``choices`` > 1, each question gets candidate answers (:func:`add_choices`): its
   answer and ``choices - 1`` distractors of the same kind (a year for a year, another
   number for a number, a name of as many words for a name where there are enough) drawn,
   seeded by the question's id, first from the answer spans of the *same passage* (other
   names and numbers it mentions), then of the same document's other passages, and only then
   of other documents (not occurring in this passage); none occurs in the question's
   sentence; the candidates are in a seeded random order. So the distractors are on the
   passage's topic, as plausible a filler of the blank as the answer without the passage,
   and the passage decides between them: the question's sentence is in it, with the answer
   (scoring: :mod:`refrag.eval.choice`).

So every question is a sentence of its passage with a named entity or number removed: the
answer is in the passage (extractive), the question carries the rest of the sentence (never
just a position), and without the passage only knowledge or a guess can fill it. Scoring is
in :mod:`refrag.eval.qa`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import string
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from refrag.data.shards import iter_windows, spread
from refrag.modeling.prompting import doc_tag

BLANK = "____"


INSTRUCTION = (
    "Fill in the blank ({blank}) with a few words from the text. Reply with those words only."
)


# refrag_rl: refrag with the chunk policy expanding a fraction p of the chunks to tokens
VARIANTS = ("no_context", "full_context", "refrag", "refrag_rl")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


_NUMBER = re.compile(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?![\w,])|(?<![\w.,])\d+(?:\.\d+)?(?![\w])")


_NAME = re.compile(r"\b[A-Z][a-z]+(?:(?:\s+(?:of|de|da|von|van|der|del|la|le))?\s+[A-Z][a-z]+)*")


@dataclass(frozen=True)
class QAExample:
    """One question about one passage; ``answer`` occurs in ``passage``."""

    id: str
    passage_id: str
    passage: str
    question: str
    answer: str
    choices: tuple[str, ...] = ()  # the answer among distractors (add_choices), or none


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: its lines (a heading is a line of its own), each split after
    ., ! or ? followed by a space and a capital or digit."""
    return [s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line) if s.strip()]


def answer_spans(sentence: str, max_words: int = 4, min_rest: int = 6) -> list[tuple[int, int]]:
    """Character spans of the candidate answers in ``sentence``: numbers and capitalized names
    not at its start, of at most ``max_words`` words, occurring once in the sentence and
    leaving at least ``min_rest`` other words."""
    words = len(sentence.split())
    spans = []
    for pattern in (_NUMBER, _NAME):
        for m in pattern.finditer(sentence):
            text = m.group()
            if m.start() == 0 or len(text.split()) > max_words:
                continue
            if sentence.count(text) != 1 or words - len(text.split()) < min_rest:
                continue
            spans.append((m.start(), m.end()))
    return sorted(set(spans))


def cloze_candidates(
    passage: str, min_words: int = 8, max_words: int = 60, keep_edges: bool = False
) -> list[tuple[str, str]]:
    """All (question sentence with a blank, answer) pairs of a passage (steps 1–2 of the
    module docstring); ``keep_edges`` keeps its first and last sentence (training data)."""
    sentences = split_sentences(passage)
    sentences = sentences if keep_edges else sentences[1:-1]
    pairs = []
    for sentence in sentences:
        if not min_words <= len(sentence.split()) <= max_words:
            continue
        for start, end in answer_spans(sentence):
            pairs.append((sentence[:start] + BLANK + sentence[end:], sentence[start:end]))
    return pairs


def build_qa(
    passages: Iterable[dict],
    *,
    seed: int = 0,
    per_passage: int = 1,
    limit: int | None = None,
    keep_edges: bool = False,
    choices: int = 0,
) -> list[QAExample]:
    """Cloze questions over ``passages`` (dicts with ``text``, or a shard window's
    ``context_text``, and an id: ``id``, or ``doc_id`` and ``window``); see the module
    docstring (``keep_edges``: :func:`cloze_candidates`; ``choices``: :func:`add_choices`).
    Deterministic in ``seed``; at most ``limit`` questions, in passage order."""
    passages = list(passages)
    examples: list[QAExample] = []
    seen: set[str] = set()
    for row in passages:
        text = row.get("text", row.get("context_text"))
        pid = _passage_id(row)
        pairs = cloze_candidates(text, keep_edges=keep_edges)
        digest = hashlib.sha256(f"{seed}:{pid}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        rng.shuffle(pairs)
        taken = 0
        for question, answer in pairs:
            key = normalize_answer(question) + "\0" + normalize_answer(answer)
            if key in seen or taken == per_passage:
                continue
            seen.add(key)
            examples.append(QAExample(f"{pid}:{taken}", pid, text, question, answer))
            taken += 1
        if limit is not None and len(examples) >= limit:
            examples = examples[:limit]
            break
    if choices > 1:
        pool = [
            (_passage_id(row), answer)
            for row in passages
            for _, answer in cloze_candidates(
                row.get("text", row.get("context_text")), keep_edges=True
            )
        ]
        examples = add_choices(examples, pool, choices, seed=seed)
    return examples


def _passage_id(row: dict) -> str:
    return str(row["id"]) if "id" in row else f"{row['doc_id']}#{row.get('window', 0)}"


def _document(passage_id: str) -> str:
    return passage_id.rsplit("#", 1)[0]


_YEAR = re.compile(r"1\d{3}|20\d{2}")


def answer_kind(answer: str) -> str:
    """``"year"`` for a year (1000–2099), ``"number"`` for another number, else
    ``"name:<words>"`` (a name of that many words)."""
    if _NUMBER.fullmatch(answer):
        return "year" if _YEAR.fullmatch(answer) else "number"
    return f"name:{len(answer.split())}"


def _tier(example: QAExample, passage_id: str) -> int | None:
    """Where a pool span comes from, for ``example``: 0 its passage, 1 another passage of its
    document, 2 another document."""
    if passage_id == example.passage_id:
        return 0
    return 1 if _document(passage_id) == _document(example.passage_id) else 2


def add_choices(
    examples: list[QAExample], pool: Iterable[tuple[str, str]], n: int, *, seed: int = 0
) -> list[QAExample]:
    """Each example with ``n`` candidate answers (step 5 of the module docstring): its answer
    and ``n - 1`` distractors from ``pool`` ((passage id, answer span) pairs): those of its
    own passage first, then of its document's other passages, then of other documents (not
    occurring in its passage); within each, of the answer's kind first (then, for a name, a
    name of another length); never one occurring in the question, distinct after
    normalization. An example with too few distractors keeps no candidates."""
    spans: dict[tuple[str, str], set[str]] = {}  # (kind, span) -> its passages
    for passage_id, span in pool:
        spans.setdefault((answer_kind(span), span), set()).add(passage_id)
    out = []
    for example in examples:
        kind = answer_kind(example.answer)
        rng = random.Random(
            int.from_bytes(hashlib.sha256(f"{seed}:{example.id}".encode()).digest()[:8], "big")
        )
        ranked = []
        for (k, span), passages in sorted(spans.items()):
            tier = min(_tier(example, p) for p in passages)
            if span in example.question or (tier == 2 and span in example.passage):
                continue
            if k != kind and not (k.startswith("name:") and kind.startswith("name:")):
                continue
            ranked.append((tier, k != kind, rng.random(), span))
        taken = {normalize_answer(example.answer)}
        picks: list[str] = []
        for *_, span in sorted(ranked):
            if len(picks) == n - 1:
                break
            if normalize_answer(span) not in taken:
                taken.add(normalize_answer(span))
                picks.append(span)
        if len(picks) < n - 1:
            out.append(replace(example, choices=()))
            continue
        candidates = [example.answer, *picks]
        rng.shuffle(candidates)
        out.append(replace(example, choices=tuple(candidates)))
    return out


def build_qa_set(
    documents: list[dict],
    *,
    encoder_tokenizer,
    decoder_tokenizer,
    context_tokens: int,
    target_tokens: int,
    max_windows: int | None,
    seed: int = 0,
    per_passage: int = 1,
    choices: int = 0,
) -> list[QAExample]:
    """The QA set of a split's ``documents``: their (context, target) windows cut as the
    shards cut them (:func:`refrag.data.shards.iter_windows`, at most ``max_windows``, spread
    over the documents), then :func:`build_qa` on the windows' context text. Prints its size."""
    windows = spread(
        list(
            iter_windows(
                documents,
                encoder_tokenizer=encoder_tokenizer,
                decoder_tokenizer=decoder_tokenizer,
                context_tokens=context_tokens,
                target_tokens=target_tokens,
            )
        ),
        max_windows,
    )
    examples = build_qa(windows, seed=seed, per_passage=per_passage, choices=choices)
    docs = {_document(e.passage_id) for e in examples}
    with_choices = sum(bool(e.choices) for e in examples)
    print(
        f"{len(examples)} questions ({with_choices} with {choices} candidates) from "
        f"{len(windows)} windows of {len(docs)} documents"
    )
    return examples


def write_qa_set(examples: Iterable[QAExample], path: str | os.PathLike) -> Path:
    """The QA set as JSON lines (one :class:`QAExample` per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(e)) + "\n" for e in examples))
    return path


def read_qa_set(path: str | os.PathLike) -> list[QAExample]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    return [QAExample(**(row | {"choices": tuple(row.get("choices", ()))})) for row in rows]


# -- answering with a model ----------------------------------------------------------------
def question_prompt(example: QAExample, variant: str) -> str:
    """The user message for one question: the passage (none, as text, or in a ``<doc>`` for
    ``refrag`` and ``refrag_rl``), then the instruction and the question."""
    ask = f"{INSTRUCTION.format(blank=BLANK)}\n{example.question}"
    if variant == "no_context":
        return ask
    if variant == "full_context":
        return f"{example.passage}\n\n{ask}"
    if variant in ("refrag", "refrag_rl"):
        return f"{doc_tag(example.passage, example.passage_id)}\n{ask}"
    raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a/an/the), single spaces (SQuAD v1.1)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())
