import json
import os
import pty
import subprocess
import sys

import pandas as pd
import pytest
from trl import SFTTrainer

from refrag.modeling import RefragModel
from refrag.modeling.prompting import render_chat, template_tokenizer
from refrag.modeling.tokenization import IGNORE_INDEX
from refrag.train.runner import train_stage
from refrag.train.sft import (
    SFTCollator,
    load_records,
    sft_dataset,
    sft_example,
    shard_records,
    user_message,
)
from refrag.train.stages import STAGES
from tests.conftest import TEXT, interrupt_at_step, write_text_shards
from tests.fake_hub import FakeHub
from tests.test_chat import ROOT, needs_tokenizers, read_until

PASSAGE = (
    "The Analytical Engine was designed by the English mathematician Charles Babbage. It was "
    "first described in 1837 as the successor to the difference engine."
)
RECORDS = [
    {"question": "Who designed the Analytical Engine?", "answer": "Charles Babbage",
     "context": PASSAGE},
    {"question": "When was it first described?", "answers": {"text": ["1837"], "answer_start": [0]},
     "context": PASSAGE},
]  # fmt: skip


def labelled_text(tok, example) -> str:
    ids = [i for i, keep in zip(example["input_ids"], example["label_mask"]) if keep]
    return tok.decoder_tokenizer.decode(ids)


def test_only_the_answer_and_its_end_of_turn_are_labelled(refrag_tokenizer):
    example = sft_example(refrag_tokenizer, user_message("Who?", [PASSAGE]), "Charles Babbage")
    assert labelled_text(refrag_tokenizer, example) == "Charles Babbage<|im_end|>\n"
    labels = refrag_tokenizer.pad([example])["labels"][0].tolist()
    first = example["label_mask"].index(True)
    assert all(label == IGNORE_INDEX for label in labels[:first])
    assert not any(m and c for m, c in zip(example["label_mask"], example["chunk_mask"]))


def test_prompt_is_what_chat_feeds_the_model_with_passages_as_chunks(refrag_tokenizer):
    user = user_message("Who designed it?", [PASSAGE, "A second passage."])
    example = sft_example(refrag_tokenizer, user, "Charles Babbage")
    dec = refrag_tokenizer.decoder_tokenizer
    chat = template_tokenizer(refrag_tokenizer)(
        render_chat(dec, [{"role": "user", "content": user}])
    )
    n = chat["input_ids"].shape[1]
    assert example["input_ids"][:n] == chat["input_ids"][0].tolist()
    assert example["chunk_mask"][:n] == chat["chunk_mask"][0].tolist()
    assert dec.decode(example["input_ids"][:3]).startswith("<|im_start|>")  # the template, no BOS
    enc_tokens = [
        len(refrag_tokenizer.encoder_tokenizer(p, add_special_tokens=False)["input_ids"])
        for p in (PASSAGE, "A second passage.")
    ]
    k = refrag_tokenizer.compression
    assert sum(example["chunk_mask"]) == sum(-(-t // k) for t in enc_tokens)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_local_files_load_with_datasets(tmp_path, suffix):
    path = tmp_path / f"qa{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    else:
        frame = pd.DataFrame(RECORDS)
        frame["answers"] = frame["answers"].apply(lambda a: a if isinstance(a, dict) else None)
        frame.to_parquet(path)
    records = load_records(path)
    assert [r["answer"] for r in records] == ["Charles Babbage", "1837"]
    assert records[0]["passages"] == [PASSAGE]


def test_a_hub_dataset_loads_its_train_files_through_huggingface_hub(tmp_path):
    """``hf:org/qa`` from a fake hub: its train split's files, read with ``datasets``."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    pd.DataFrame([RECORDS[0]]).drop(columns="answers", errors="ignore").to_parquet(
        repo / "data/train-00000.parquet"
    )
    pd.DataFrame([{"question": "held out?", "answer": "no"}]).to_parquet(
        repo / "data/test-00000.parquet"
    )
    with FakeHub({"datasets/org/qa": repo}) as hub:
        env = hub.env(tmp_path / "home", "hf_sft_token")
        code = "import json; from refrag.train.sft import load_records; print(json.dumps(load_records('hf:org/qa')))"
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(result.stdout.strip().splitlines()[-1])
    assert records == [
        {"question": RECORDS[0]["question"], "answer": "Charles Babbage", "passages": [PASSAGE]}
    ]
    assert all(auth == "Bearer hf_sft_token" for _, path, auth in hub.requests if "org/qa" in path)


def test_a_stage_reads_the_data_its_hyperparameters_name(tiny_checkpoint, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps(RECORDS[0]) + "\n")
    hp = {"steps": 1, "batch_size": 1, "data": str(data)}
    missing = tmp_path / "no-shards"  # the workflow's default data, never read
    train_stage(
        "sft", init=tiny_checkpoint, data=missing, out=tmp_path / "sft", compression=4, hp=hp
    )
    assert json.loads((tmp_path / "sft/training_log.json").read_text())["hp"]["data"] == str(data)


def test_an_interrupted_sft_stage_resumes_from_its_last_complete_checkpoint(
    tiny_checkpoint, tmp_path, monkeypatch
):
    from refrag.train.resume import last_complete_checkpoint
    from refrag.train.sft import RefragSFTTrainer

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    hp = {"steps": 4, "batch_size": 1, "save_steps": 2, "logging_steps": 1}
    run = {"init": tiny_checkpoint, "data": data, "out": tmp_path / "sft", "compression": 4}
    restore = interrupt_at_step(monkeypatch, RefragSFTTrainer, 3)
    with pytest.raises(KeyboardInterrupt):
        train_stage("sft", **run, hp=hp)
    assert last_complete_checkpoint(tmp_path / "sft.work").endswith("checkpoint-2")
    restore()
    train_stage("sft", **run, hp=hp)
    log = json.loads((tmp_path / "sft/training_log.json").read_text())["log_history"]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4]


def test_unusable_sft_data_is_named(tmp_path):
    with pytest.raises(ValueError, match="not a shard folder"):
        load_records(tmp_path / "data.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="question and an answer"):
        load_records(bad)


@pytest.fixture(scope="module")
def long_shards(tmp_path_factory, encoder_tokenizer, decoder_tokenizer):
    """Train shards of (96 + 8)-token windows: several sentences each."""
    docs = [{"doc_id": f"d{i}", "title": "", "text": TEXT[i * 7 :] * 2} for i in range(3)]
    out = tmp_path_factory.mktemp("long-shards") / "train"
    return write_text_shards(out, docs, (encoder_tokenizer, decoder_tokenizer), context_tokens=96)


def test_default_data_asks_cloze_questions_about_the_train_windows(long_shards):
    from refrag.data.shards import read_shards

    records = shard_records(long_shards)
    windows = set(read_shards(long_shards)["context_text"])
    assert records and all(r["passages"][0] in windows for r in records)
    assert all(r["answer"] in r["passages"][0] and "____" in r["question"] for r in records)


def test_dataset_is_a_pretokenized_datasets_table_cycled_to_the_steps(
    long_shards, refrag_tokenizer
):
    hp = STAGES["sft"].defaults.merged({"steps": 3, "batch_size": 4})
    dataset, collator = sft_dataset(long_shards, refrag_tokenizer, hp)
    assert len(dataset) >= 12 and isinstance(collator, SFTCollator)
    batch = collator([dataset[i] for i in range(4)])
    assert batch["chunk_input_ids"].shape[0] == int(batch["chunk_mask"].sum()) > 0
    assert (batch["labels"] != IGNORE_INDEX).any()


@pytest.fixture(scope="module")
def sft_run(tiny_checkpoint, tmp_path_factory):
    """The sft stage on the tiny model, overfit to one question about one passage; the
    SFTTrainer instances it built."""
    root = tmp_path_factory.mktemp("sft")
    data = root / "qa.jsonl"
    data.write_text(json.dumps(RECORDS[0]) + "\n")
    trainers = []
    init = SFTTrainer.__init__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            SFTTrainer,
            "__init__",
            lambda self, *a, **kw: trainers.append(self) or init(self, *a, **kw),
        )
        metrics = train_stage(
            "sft",
            init=tiny_checkpoint,
            data=data,
            out=root / "sft",
            compression=4,
            hp={"steps": 40, "batch_size": 1, "lr": 3e-3, "warmup_ratio": 0, "logging_steps": 1},
        )
    return root / "sft", trainers, metrics


def test_sft_stage_trains_with_trl_and_writes_a_model_folder(sft_run):
    out, trainers, metrics = sft_run
    assert len(trainers) == 1 and trainers[0].args.dataset_kwargs == {"skip_prepare_dataset": True}
    log = json.loads((out / "training_log.json").read_text())
    losses = [e["loss"] for e in log["log_history"] if "loss" in e]
    assert log["stage"] == "sft" and len(losses) == 40 and metrics["train_loss"] > 0
    assert losses[-1] < losses[0] / 2  # it learns the one answer
    assert RefragModel.from_pretrained(out).config.train_decoder


@needs_tokenizers
def test_chat_answers_a_question_about_a_file_from_the_sft_checkpoint(sft_run, tmp_path):
    """``refrag chat --checkpoint …/sft --doc FILE`` in a pseudo-terminal: the model was
    fine-tuned on this one question about this passage, so its answer is known."""
    (tmp_path / "engine.txt").write_text(PASSAGE + "\n")
    primary, secondary = pty.openpty()
    command = [sys.executable, "-m", "refrag.cli", "chat", "--checkpoint", str(sft_run[0])]
    proc = subprocess.Popen(
        [*command, "--doc", str(tmp_path / "engine.txt"), "--max-new-tokens", "4"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    os.close(secondary)
    try:
        read_until(primary, b"you> ")
        os.write(primary, f"{RECORDS[0]['question']}\n".encode())
        turn = read_until(primary, b"you> ")
        assert b"Charles Babbage" in turn and b"chunk embeddings" in turn
        os.write(primary, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(primary)
