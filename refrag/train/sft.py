"""Supervised fine-tuning (paper stage 3) on passage-grounded questions, with TRL.

An example is one chat turn rendered as ``refrag chat`` renders it (:func:`refrag.modeling.prompting.render_chat`,
the decoder's chat template): the user message holds the context passages as ``<doc>``
elements, which the document-tag tokenizer sends through the encoder as chunk embeddings,
then the question; the assistant's reply is the answer and the template's end-of-turn text.
Only the reply's tokens are labelled; the prompt and the chunk positions are ``-100``.

Data (what the ``sft`` stage's ``data`` names, :func:`sft_dataset`):

- a train shard folder (the default): the cloze construction of :mod:`refrag.eval.qa` applied to
  the training documents' windows (their first and last sentences kept), asked exactly as the
  QA evaluation asks (:func:`refrag.data.qa.question_prompt`, variant ``refrag``). The held-out
  documents are never read: the evaluation's questions come from the test split's windows;
- a local ``.jsonl``/``.json``/``.parquet`` file, or ``hf:<dataset>[@revision]``, loaded with
  ``datasets``: rows with ``question``, an answer (``answer``, or SQuAD's ``answers.text``)
  and optional passages (``passages``, a list, or ``context``, a string).

Trainer: :class:`RefragSFTTrainer`, a thin subclass of TRL's ``SFTTrainer``. TRL 1.16 carries
our batches as they are: a pre-tokenized ``datasets.Dataset`` with
``dataset_kwargs={"skip_prepare_dataset": True}`` skips its tokenization, our collator pads
(the chunk rows included) and ``remove_unused_columns=False`` keeps the chunk columns. Its
own loss cannot be used: it patches the model's forward with a fused LM head that runs
``model.base_model`` and expects a ``last_hidden_state``, which a :class:`RefragModel` (whose
chunk embeddings go in before the decoder) does not expose; so ``compute_loss`` is the
model's causal-LM loss over the labelled tokens, as in the other stages, computed the way
``Trainer.compute_loss`` computes it: ``num_items_in_batch`` (the labelled tokens of the whole
accumulated batch) reaches the model, which then sums over tokens and divides by that count.
Dropping it would multiply the loss and its gradients by the accumulation steps, since the
Trainer skips its own division for a model that takes loss kwargs
(``tests/test_trainers.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets
from huggingface_hub import snapshot_download
from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from refrag.data.qa import build_qa, question_prompt
from refrag.data.shards import read_shards
from refrag.modeling.prompting import doc_tag, render_chat, template_tokenizer
from refrag.modeling.tokenization import RefragTokenizer
from refrag.train.stages import StageConfig

DATA_FILES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # suffix: datasets builder


def user_message(question: str, passages: list[str] = ()) -> str:
    """The user's turn: each passage as a ``<doc>`` (ids 1, 2, …), then the question."""
    docs = [doc_tag(p, str(i + 1)) for i, p in enumerate(passages)]
    return "\n".join([*docs, question])


def sft_example(tok: RefragTokenizer, user: str, answer: str) -> dict[str, list]:
    """One training sequence (:meth:`RefragTokenizer.encode_parts`): the chat prompt of
    ``user`` (docs as chunks, the rest as unlabelled decoder tokens), then the assistant's
    reply ``answer`` with the template's end-of-turn text, labelled."""
    tok = template_tokenizer(tok)  # no BOS where the template opens the sequence, as in chat
    dec = tok.decoder_tokenizer
    messages = [{"role": "user", "content": user}]
    prompt = render_chat(dec, messages)
    if getattr(dec, "chat_template", None):
        full = dec.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer}], tokenize=False
        )
        if not full.startswith(prompt):
            raise ValueError("the chat template's reply does not extend its generation prompt")
        reply = full[len(prompt) :]
    else:
        reply = f" {answer}{dec.eos_token or ''}"
    parts = [
        ("prompt" if seg.type == "decoder" else "chunks", seg.tokens)
        for seg in tok.parse_and_tokenize(prompt)
    ]
    reply_ids = dec(reply, add_special_tokens=False)["input_ids"]
    return tok.encode_parts([*parts, ("text", reply_ids)])


def record_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """A dataset row → ``{"question", "answer", "passages"}`` (see the module docstring)."""
    answer = row.get("answer")
    if answer is None and row.get("answers") is not None:
        answers = row["answers"]
        texts = answers.get("text") if isinstance(answers, dict) else answers
        answer = texts[0] if texts else None
    if not row.get("question") or not answer:
        raise ValueError(f"a row needs a question and an answer; got columns {sorted(row)}")
    passages = row.get("passages")
    if passages is None:
        passages = [row["context"]] if row.get("context") else []
    return {"question": row["question"], "answer": str(answer), "passages": list(passages)}


def load_records(source: str | os.PathLike) -> list[dict[str, Any]]:
    """Question-answer records of a local JSON-lines/JSON/Parquet file, or of
    ``hf:<dataset>[@revision]``: its data files are downloaded with ``huggingface_hub`` (token
    ``HF_TOKEN`` from the environment) and those of its ``train`` split (files named so; all
    of them where none is) read; loaded with ``datasets``."""
    source = str(source)
    if source.startswith("hf:"):
        name, _, revision = source.removeprefix("hf:").partition("@")
        folder = snapshot_download(
            repo_id=name,
            repo_type="dataset",
            revision=revision or None,
            token=os.environ.get("HF_TOKEN") or None,
            allow_patterns=[f"*{suffix}" for suffix in DATA_FILES],
        )
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix in DATA_FILES)
        files = [p for p in files if "train" in p.name] or files
        if not files:
            raise ValueError(f"SFT data {source}: the dataset holds no .jsonl/.json/.parquet file")
    else:
        files = [Path(source)]
        if files[0].suffix not in DATA_FILES or not files[0].is_file():
            raise ValueError(
                f"SFT data {source}: not a shard folder, a .jsonl/.json/.parquet file or hf:<dataset>"
            )
    kinds = {DATA_FILES[p.suffix] for p in files}
    if len(kinds) > 1:
        raise ValueError(f"SFT data {source}: mixes file formats ({', '.join(sorted(kinds))})")
    table = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
    return [record_from_row(row) for row in table]


def shard_records(shard_dir: str | os.PathLike, seed: int = 0) -> list[dict[str, Any]]:
    """Cloze records of a (train) shard folder's windows, asked as the QA evaluation asks."""
    windows = read_shards(shard_dir).to_dict("records")
    examples = build_qa(windows, seed=seed, keep_edges=True)
    if not examples:
        raise ValueError(
            f"no cloze question in the {len(windows)} windows of {shard_dir} (no sentence of 8-60 "
            "words with a name or number): use longer windows or name an SFT dataset"
        )
    return [
        {"question": question_prompt(e, "no_context"), "answer": e.answer, "passages": [e.passage]}
        for e in examples
    ]


class SFTCollator:
    """Pads :func:`sft_example` rows (:meth:`RefragTokenizer.pad`); keeps the tokenizer pair
    for the trainer."""

    def __init__(self, tok: RefragTokenizer):
        self.tok = tok

    def __call__(self, rows: list[dict]) -> dict:
        return self.tok.pad(rows)


def sft_dataset(
    data: str | os.PathLike, tok: RefragTokenizer, hp: StageConfig
) -> tuple[datasets.Dataset, SFTCollator]:
    """The ``sft`` stage's examples (a ``datasets.Dataset``), cycled to fill every step."""
    records = shard_records(data, seed=hp.seed) if Path(data).is_dir() else load_records(data)
    base = [
        sft_example(tok, user_message(r["question"], r["passages"]), r["answer"]) for r in records
    ]
    total = hp.steps * hp.batch_size * hp.grad_accum
    rows = [base[i % len(base)] for i in range(max(total, len(base)))]
    return datasets.Dataset.from_list(rows), SFTCollator(tok)


class RefragSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer whose loss is the REFRAG model's causal-LM loss (see the module
    docstring for why its fused loss does not apply)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


def sft_trainer(hp: StageConfig, **kwargs: Any) -> RefragSFTTrainer:
    """The ``sft`` stage's trainer: ``kwargs`` are the Trainer's (``args`` may be plain
    ``TrainingArguments``; they become an :class:`SFTConfig` that skips TRL's dataset
    preparation). The decoder tokenizer is the processing class."""
    args = kwargs.pop("args")
    settings = args.to_dict() | {"hub_token": args.hub_token}
    settings |= {"dataset_kwargs": {"skip_prepare_dataset": True}, "remove_unused_columns": False}
    kwargs.setdefault("processing_class", kwargs["data_collator"].tok.decoder_tokenizer)
    return RefragSFTTrainer(args=SFTConfig(**settings), **kwargs)
