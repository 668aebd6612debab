"""refrag serve: the real ``openai`` client against the server on loopback (tiny model)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import openai
import pytest
import torch

from refrag.cli import load_index, main
from refrag.modeling import RefragModel
from refrag.modeling.prompting import render_chat, template_tokenizer
from refrag.retrieval import PassageIndex, chunk_documents
from refrag.serve.api import ServeLimits
from refrag.serve.engine import BatchingEngine, GenerationRequest, TokenEvent
from refrag.serve.inference import greedy_generate
from refrag.serve.server import ChatService, running_server
from tests.conftest import ROOT, TEXT, tiny_config

MODEL = "tiny-refrag"
DOC = f"<doc id='engine'>{TEXT[:400]}</doc>\nWho designed the engine?"


@dataclass(frozen=True)
class FakePassage:
    text: str
    doc_id: str
    passage_id: str


class FakeRetriever:
    """Returns the same passages for any query, and remembers the queries."""

    def __init__(self):
        self.queries: list[tuple[str, int]] = []

    def search(self, query: str, n: int) -> list[FakePassage]:
        self.queries.append((query, n))
        return [
            FakePassage(TEXT[i * 100 : i * 100 + 300], "babbage", f"babbage#p{i}") for i in range(n)
        ]


@pytest.fixture(scope="module")
def varied_model() -> RefragModel:
    """The tiny model with larger random weights, so greedy text varies token to token."""
    torch.manual_seed(0)
    model = RefragModel(tiny_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def server(varied_model, refrag_tokenizer):
    """The server in a thread: batches of up to 4 gathered over 0.3 s, small limits."""
    engine = BatchingEngine(varied_model, refrag_tokenizer, max_batch=4, batch_wait_s=0.3)
    limits = ServeLimits(
        max_request_bytes=20_000, max_documents=3, max_prompt_positions=400, max_new_tokens=64
    )
    retriever = FakeRetriever()
    service = ChatService(engine, model_name=MODEL, limits=limits, retriever=retriever)
    with running_server(service) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        yield client, service, retriever


def ask(client, content: str, n: int = 8, **kwargs):
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=n,
        extra_body={"ignore_eos": True, **kwargs.pop("extra_body", {})},
        **kwargs,
    )


def test_models_and_health_answer(server):
    client, service, _ = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = get_json(str(client.base_url).replace("/v1/", "/health"))
    assert health["status"] == "ok" and health["model"] == MODEL


def test_completion_matches_greedy_generate(server, varied_model, refrag_tokenizer):
    client, _, _ = server
    answer = ask(client, DOC, n=8)
    tok = template_tokenizer(refrag_tokenizer)
    text = render_chat(tok.decoder_tokenizer, [{"role": "user", "content": DOC}])
    expected = greedy_generate(varied_model, tok(text), max_new_tokens=8)[0]
    assert answer.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 8
    assert answer.usage.prompt_tokens == len(tok.encode(text)["input_ids"])
    assert answer.model_extra["refrag"]["documents"] == 1
    assert answer.model_extra["refrag"]["chunks"] > 0


def test_stream_sends_openai_chunks_with_the_same_text(server):
    client, _, _ = server
    whole = ask(client, DOC, n=12).choices[0].message.content
    chunks = list(ask(client, DOC, n=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_concurrent_requests_share_forward_passes_and_match_solo(server):
    client, service, _ = server
    prompts = [DOC, "Say something about engines.", f"<doc id='x'>{TEXT[200:700]}</doc> Summarise."]
    solo = [ask(client, p, n=10).choices[0].message.content for p in prompts]
    stats = service.engine.stats
    passes, rows = stats.forward_passes, stats.rows
    together: list[str | None] = [None] * len(prompts)

    def one(i: int) -> None:
        together[i] = ask(client, prompts[i], n=10).choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == solo
    assert stats.max_batch_seen >= 2
    # 3 requests x 10 tokens alone would take 30 passes; batched they share them
    assert stats.rows - rows == 30 and stats.forward_passes - passes < 30


def test_stop_string_ends_the_answer_before_it(server):
    client, _, _ = server
    whole = ask(client, DOC, n=12).choices[0].message.content
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    cut = ask(client, DOC, n=12, stop=[stop])
    assert cut.choices[0].message.content == whole[: whole.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_repeats(server):
    client, _, _ = server
    first, again, other = (
        ask(client, DOC, n=10, temperature=1.5, seed=s).choices[0].message.content
        for s in (7, 7, 8)
    )
    assert first == again and first != other


def test_chunk_cache_is_shared_across_requests(server):
    client, service, _ = server
    doc = f"<doc id='cache'>{TEXT[50:450]} unique words for this test</doc> Who?"
    ask(client, doc, n=1)
    cache = service.engine.chunk_cache
    misses, hits = cache.misses, cache.hits
    ask(client, doc + " Again?", n=1)
    assert cache.misses == misses and cache.hits > hits


def test_retrieve_prepends_the_retrievers_passages(server):
    client, _, retriever = server
    answer = ask(client, "Who designed the Analytical Engine?", n=2, extra_body={"retrieve": 2})
    extra = answer.model_extra["refrag"]
    assert extra["retrieved"] == ["babbage#p0", "babbage#p1"]
    assert extra["documents"] == 2 and extra["chunks"] > 0
    assert retriever.queries[-1] == ("Who designed the Analytical Engine?", 2)


@pytest.mark.parametrize(
    ("content", "kwargs", "status", "code"),
    [
        (
            "<doc id='a'>x</doc><doc id='b'>y</doc><doc id='c'>z</doc><doc id='d'>w</doc>?",
            {},
            400,
            "too_many_documents",
        ),
        ("<doc id='a'>never closed", {}, 400, "invalid_doc_markup"),
        ("word " * 600, {}, 400, "context_length_exceeded"),
        ("hi", {"n": 65}, 400, "invalid_value"),
        ("hi", {"extra_body": {"retrieve": 99}}, 400, "invalid_value"),
        ("x" * 30_000, {}, 413, "request_too_large"),
    ],
    ids=["documents", "markup", "positions", "max_tokens", "retrieve", "body"],
)
def test_limits_answer_4xx_in_openai_format(server, content, kwargs, status, code):
    client, _, _ = server
    with pytest.raises(openai.APIStatusError) as caught:
        ask(client, content, **kwargs)
    err = caught.value
    assert err.status_code == status
    assert err.body["code"] == code and err.body["type"] == "invalid_request_error"
    assert err.body["message"]


def test_unknown_model_is_404(server):
    client, _, _ = server
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_finishes_in_flight_request_and_refuses_new_ones(tiny_checkpoint):
    """`refrag serve` as a process: SIGTERM mid-stream; the stream still gets all its tokens,
    a request made after the signal is refused, and the process exits 0."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "refrag.cli", "--cache-dir", str(ROOT / "resources/models"),
           "serve", "--checkpoint", str(tiny_checkpoint), "--port", str(port), "--device", "cpu",
           "--model-name", MODEL]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if get_json(f"{base}/health")["status"] == "ok":
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        stream = ask(client, DOC, n=250, stream=True)
        pieces = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                break
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises((openai.APIConnectionError, openai.APIStatusError)) as refused:
            ask(openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0), "hi", n=1)
        if isinstance(refused.value, openai.APIStatusError):
            assert refused.value.status_code == 503
        finish = None
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        assert finish == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_command_help_lists_the_limits(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--max-documents", "--max-prompt-positions", "--index", "--max-batch"):
        assert flag in out


def test_retrieve_from_a_real_passage_index(tmp_path, encoder_dir, varied_model, refrag_tokenizer):
    """`--index FOLDER` (the CLI's loader) behind the server: the passage nearest the question
    is the one prepended."""
    docs = [
        {"doc_id": "engine", "text": "The Analytical Engine was designed by Charles Babbage."},
        {"doc_id": "volcano", "text": "A volcano lets lava and ash escape from a magma chamber."},
    ]
    PassageIndex.build(chunk_documents(docs, words=20), encoder_dir, progress=False).save(
        tmp_path / "index"
    )
    engine = BatchingEngine(varied_model, refrag_tokenizer, max_batch=1)
    service = ChatService(
        engine, model_name=MODEL, retriever=load_index(str(tmp_path / "index"), None, "cpu")
    )
    with running_server(service) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        answer = ask(client, "Where does lava come from?", n=2, extra_body={"retrieve": 1})
    assert answer.model_extra["refrag"]["retrieved"] == ["volcano#p0"]


def test_serve_with_a_missing_index_is_one_line_before_loading_the_model(tmp_path):
    with pytest.raises(SystemExit) as caught:
        main(["--cache-dir", str(tmp_path), "serve", "--index", str(tmp_path / "no-index")])
    message = str(caught.value.code)
    assert message.startswith("refrag serve: ") and "no-index" in message
    assert "\n" not in message


def test_requests_arriving_mid_decode_join_the_batch_and_match_solo(varied_model, refrag_tokenizer):
    """B (a longer prompt) arrives at A's first token, C (short) at A's fifth: both join
    A's batch between decode steps, and every answer is the one it gets alone."""
    engine = BatchingEngine(varied_model, refrag_tokenizer, max_batch=4, batch_wait_s=0)
    engine.start()
    prompts = {"a": "Tell me a story.", "b": DOC, "c": "Hi"}
    sizes = {"a": 30, "b": 12, "c": 8}

    def submit(name: str, out: dict, done: dict, on_token=None) -> None:
        out[name], done[name] = [], threading.Event()

        def sink(event: TokenEvent) -> None:
            if event.token_id is None:
                done[name].set()
                return
            out[name].append(event.token_id)
            if on_token:
                on_token(len(out[name]))

        encoded = refrag_tokenizer.encode(prompts[name])
        engine.submit(GenerationRequest(encoded, sizes[name], sink, ignore_eos=True))

    solo: dict = {}
    for name in prompts:
        waits: dict = {}
        submit(name, solo, waits)
        waits[name].wait(60)
    joined: dict = {}
    waits = {}

    def on_a(count: int) -> None:  # runs on the worker thread, between two decode steps
        if count == 1:
            submit("b", joined, waits)
        if count == 5:
            submit("c", joined, waits)

    submit("a", joined, waits, on_a)
    for name in prompts:
        assert waits.get(name) is not None and waits[name].wait(60), name
    engine.close()
    assert joined == solo
    assert engine.stats.joined == 2 and engine.stats.max_batch_seen >= 2


def test_a_failing_forward_is_a_500_and_the_server_goes_on(varied_model, refrag_tokenizer):
    engine = BatchingEngine(varied_model, refrag_tokenizer, max_batch=2, batch_wait_s=0)
    service = ChatService(engine, model_name=MODEL)
    real = engine._prefill
    calls = []

    def broken_once(group):
        calls.append(len(group))
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(group)

    engine._prefill = broken_once
    with running_server(service) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            ask(client, DOC, n=2)
        assert "out of memory (simulated)" in caught.value.body["message"]
        assert caught.value.body["type"] == "server_error"
        assert ask(client, DOC, n=2).choices[0].finish_reason == "length"
    assert engine.pending == 0
