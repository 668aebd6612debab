"""``refrag chat``: a tiny random checkpoint with the real tokenizers, driven through a pty."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, LlamaConfig

from refrag.chat import ChatSession
from refrag.cli import main
from refrag.inference import load_refrag
from refrag.integrity import write_manifest
from refrag.modeling import RefragConfig, RefragModel
from refrag.tokenization import RefragTokenizer

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "resources" / "models"
DEC_DIR, ENC_DIR = MODELS / "smollm2-135m-instruct", MODELS / "all-minilm-l6-v2"
needs_tokenizers = pytest.mark.skipif(
    not (DEC_DIR / "tokenizer.json").is_file() or not (ENC_DIR / "tokenizer.json").is_file(),
    reason="run `refrag fetch-models` first",
)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A RefragModel folder (random weights, tiny shapes) with its RefragTokenizer."""
    torch.manual_seed(0)
    dec_tok, enc_tok = (
        AutoTokenizer.from_pretrained(DEC_DIR),
        AutoTokenizer.from_pretrained(ENC_DIR),
    )
    decoder = LlamaConfig(
        vocab_size=len(dec_tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    encoder = BertConfig(
        vocab_size=len(enc_tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    path = tmp_path_factory.mktemp("chat") / "ckpt"
    RefragModel(RefragConfig(encoder=encoder, decoder=decoder, compression=4)).save_pretrained(path)
    RefragTokenizer(enc_tok, dec_tok, compression=4).save_pretrained(path)
    write_manifest(path)  # what training's save writes last; every load checks it
    return path


CHAT_ARGS = ["--max-new-tokens", "5", "--device", "cpu"]
DOC = "<doc id='ada'>Ada Lovelace wrote about the Analytical Engine of Charles Babbage.</doc>"


@needs_tokenizers
def test_second_turn_reuses_the_kv_cache_and_answers_as_a_fresh_session(checkpoint):
    model, tok = load_refrag(checkpoint)
    a = ChatSession(model, tok, max_new_tokens=6)
    a.turn(f"{DOC} Who wrote about the engine?")
    answer, stats = a.turn("Say it again.")
    assert stats.reused_positions > stats.chunks > 0
    b = ChatSession(model, RefragTokenizer.from_pretrained(checkpoint), max_new_tokens=6)
    b.messages = a.messages[:2]  # same history, empty KV cache
    fresh, fresh_stats = b.turn("Say it again.")
    assert fresh_stats.reused_positions == 0
    assert fresh == answer


@needs_tokenizers
def test_prompts_run_non_interactively_with_json_lines(checkpoint, capsys, tmp_path):
    doc = tmp_path / "notes.txt"
    doc.write_text("The Analytical Engine was designed by Charles Babbage.")
    argv = ["chat", "--checkpoint", str(checkpoint), "--doc", str(doc), "--device", "cpu"]
    main(
        [
            *argv,
            "--max-new-tokens",
            "4",
            "--json",
            "--prompt",
            "Who designed it?",
            "--prompt",
            "When?",
        ]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Who designed it?", "When?"]
    assert rows[0]["chunks"] > 0 and rows[0]["reused_positions"] == 0
    assert rows[1]["reused_positions"] > 0
    assert all(r["ttft_ms"] > 0 and r["new_tokens"] == 4 for r in rows)


@needs_tokenizers
def test_bad_doc_markup_is_reported_and_the_session_goes_on(checkpoint, capsys):
    with pytest.raises(SystemExit) as exc:
        argv = [
            "chat",
            "--checkpoint",
            str(checkpoint),
            *["--max-new-tokens", "2", "--json", "--device", "cpu"],
        ]
        main([*argv, "--prompt", "<doc>no id</doc> hi", "--prompt", "hello"])
    assert exc.value.code == 1
    out = capsys.readouterr()
    assert "without an id" in out.err
    assert [json.loads(line)["prompt"] for line in out.out.splitlines()] == ["hello"]


def read_until(fd: int, marker: bytes, timeout: float = 120.0) -> bytes:
    buf, deadline = b"", time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(
                f"no {marker!r} within {timeout} s; got {buf.decode(errors='replace')!r}"
            )
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            chunk = b""
        if not chunk:
            raise AssertionError(
                f"terminal closed before {marker!r}; got {buf.decode(errors='replace')!r}"
            )
        buf += chunk
    return buf


@needs_tokenizers
def test_interactive_chat_in_a_pseudo_terminal(checkpoint):
    primary, secondary = pty.openpty()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "refrag.cli", "chat", "--checkpoint", str(checkpoint), *CHAT_ARGS],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        cwd=ROOT,
        env=env,
    )
    os.close(secondary)
    try:
        banner = read_until(primary, b"you> ")
        assert b"/doc PATH" in banner
        os.write(primary, f"{DOC} Who wrote about the engine?\n".encode())
        first = read_until(primary, b"you> ")
        assert b"refrag> " in first and b"TTFT" in first and b"chunk embeddings" in first
        os.write(primary, b"/reset\n")
        assert b"conversation cleared" in read_until(primary, b"you> ")
        os.write(primary, b"And then?\n")
        assert b"TTFT" in read_until(primary, b"you> ")
        os.write(primary, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(primary)


@pytest.mark.slow
def test_chat_with_the_default_models(capsys):
    if not (DEC_DIR / "model.safetensors").is_file():
        pytest.skip("run `refrag fetch-models` first")
    argv = ["chat", "--max-new-tokens", "6", "--json", "--device", "cpu"]
    main([*argv, "--prompt", "What is the capital of France?"])
    row = json.loads(capsys.readouterr().out)
    assert row["new_tokens"] > 0 and row["answer"]
