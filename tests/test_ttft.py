"""The TTFT benchmark (refrag.bench.ttft): what it runs, computes and reports; never how fast."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from refrag.bench import output, profile, shapes, timing, ttft
from refrag.modeling import RefragModel
from refrag.serve.chunk_cache import ChunkEmbeddingCache
from refrag.serve.inference import prefill

from .attention_spy import eager_attention_calls

ROOT = Path(__file__).resolve().parents[1]
TINY = "--device cpu --decoder-shape tiny --encoder-shape tiny --repeats 1 --warmup 0"
TINY += " --new-tokens 3 --quiet"


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory) -> tuple[list[dict], Path, list[str]]:
    """One run of the benchmark's script on tiny random shapes: JSON rows, plot, eager calls."""
    out = tmp_path_factory.mktemp("bench")
    argv = [*f"{TINY} --contexts 64,128 --k 8,16".split()]
    argv += ["--json", str(out / "ttft.json"), "--plot", str(out / "ttft.png")]
    old = sys.argv
    sys.argv = [str(ROOT / "benchmarks/ttft.py"), *argv, "--baseline-attn", "sdpa"]
    try:
        with eager_attention_calls() as calls:
            runpy.run_path(str(ROOT / "benchmarks/ttft.py"), run_name="__main__")
    finally:
        sys.argv = old
    return json.loads((out / "ttft.json").read_text()), out / "ttft.png", calls


def test_script_writes_a_row_for_every_context_and_k_and_a_plot(tiny_rows):
    rows, fig, _ = tiny_rows
    assert [(r["context"], r["k"]) for r in rows] == [(64, 8), (64, 16), (128, 8), (128, 16)]
    assert all(set(ttft.ROW_KEYS) <= set(r) for r in rows)
    assert fig.stat().st_size > 0


def test_rows_record_the_settings_that_ran(tiny_rows):
    rows, _, eager_calls = tiny_rows
    assert eager_calls == []  # --baseline-attn sdpa and REFRAG on sdpa: no eager kernel ran
    for r in rows:
        assert (r["attn"], r["encoder_attn"], r["baseline_attn"]) == ("sdpa",) * 3
        assert (r["dtype"], r["device"], r["threads"]) == (
            "float32",
            "cpu",
            torch.get_num_threads(),
        )
        assert r["baseline_graph"] is r["refrag_graph"] is False  # no CUDA here
        assert set(r["baseline_candidates_ms"]) == {"sdpa"}


def test_rows_compute_ratios_and_the_limit_from_the_positions_fed(tiny_rows):
    rows, _, _ = tiny_rows
    d = shapes.DECODER_SHAPES["tiny"]["hidden_size"]
    for r in rows:
        assert r["refrag_positions"] == 1 + r["context"] // r["k"] + 16
        assert r["baseline_positions"] == 1 + r["context"] + 16
        assert r["analytic_limit"] == pytest.approx(
            ttft.analytic_limit(d, r["baseline_positions"], r["refrag_positions"]), abs=0.01
        )
        for mode in ("cached", "recomputed"):
            ratio = r["baseline_ms"] / r[f"refrag_{mode}_ms"]
            if r[f"speedup_{mode}"] is None:  # over the limit: flagged, not reported
                assert ratio > r["analytic_limit"] and f"speedup_{mode}" in r["suspect"]
            else:
                assert r[f"speedup_{mode}"] == pytest.approx(
                    ratio, rel=1e-2, abs=1e-3
                )  # rounded to 3 decimals
                assert r[f"speedup_{mode}"] <= r["analytic_limit"]


def test_the_limit_counts_bos_and_question_tokens():
    # default models (d=576), s=2048, k=16, q=16: 2,065 positions against 1 + 128 + 16
    assert ttft.analytic_limit(576, 2065, 145) == pytest.approx(21.84, abs=0.01)
    assert ttft.paper_limit(16, 576, 2048) == pytest.approx(24.57, abs=0.01)
    assert ttft.paper_limit(16, 4096, 16384) == pytest.approx(25.6, abs=0.05)
    assert ttft.paper_limit(32, 4096, 16384) == pytest.approx(52.2, abs=0.1)


def over_limit_row(**extra) -> dict:
    row = {
        "context": 2048,
        "k": 16,
        "baseline_ms": 5000.0,
        "baseline_candidates_ms": {"sdpa": 4900.0, "eager": 16000.0},
        "speedup_cached": 30.0,
        "speedup_recomputed": 10.0,
        "analytic_limit": 21.84,
        "suspect": {},
        "threads": 2,
        "load_avg": 0.5,
    }
    return row | extra


def test_a_ratio_over_the_limit_is_a_warning_not_a_result(capsys):
    row = over_limit_row()
    ttft.flag_over_limit(row)
    assert row["speedup_cached"] is None and row["speedup_recomputed"] == 10.0
    assert "30.0x above the analytic limit 21.84x" in row["suspect"]["speedup_cached"]
    assert "WARNING s=2048 k=16 cached" in capsys.readouterr().err
    assert "suspect" in output.format_table([row | _table_fields()])


def test_the_warning_names_a_busy_machine_or_a_noisy_baseline():
    busy = over_limit_row(load_avg=4.5)
    ttft.flag_over_limit(busy)
    assert "busy machine (load 4.5 on 2 threads)" in busy["suspect"]["speedup_cached"]
    noisy = over_limit_row(baseline_ms=9000.0)
    ttft.flag_over_limit(noisy)
    assert "slower than its selection run" in noisy["suspect"]["speedup_cached"]


def _table_fields() -> dict:
    keys = ("refrag_cached_ms", "refrag_recomputed_ms", "cache_lookup_ms")
    return {key: 1.0 for key in keys} | {
        "baseline_attn": "sdpa",
        "baseline_graph": False,
        "baseline_ttit_ms": 1.0,
        "refrag_ttit_ms": 1.0,
        "ttit_machinery": "DynamicCache, eager",
    }


@pytest.mark.parametrize("fast", ["sdpa", "eager"])
def test_the_baseline_is_the_fastest_candidate_and_runs_with_its_kernel(fast, monkeypatch):
    args = ttft.parse_args([*TINY.split(), "--contexts", "64", "--k", "8"])
    model = shapes.build_model(args, torch.device("cpu"), torch.float32)
    x = timing.make_inputs(model, 64, 8, 16, torch.Generator().manual_seed(0))
    seen = []

    def fake_timed_ms(fn, device):  # the candidate running `fast` attention is the quick one
        fn()
        seen.append(timing.attn_of(model.decoder))
        return 1.0 if seen[-1] == fast else 2.0

    monkeypatch.setattr(timing, "timed_ms", fake_timed_ms)
    candidates = timing.baseline_candidates(torch.device("cpu"), None)
    assert [c.label for c in candidates] == ["sdpa", "eager"]
    prompt, attn, times = timing.choose_baseline(model, x, torch.device("cpu"), candidates, args)
    assert attn == fast and times == {fast: 1.0, ({"sdpa", "eager"} - {fast}).pop(): 2.0}
    assert seen == ["sdpa", "eager"]  # each candidate timed with its own kernel
    assert timing.attn_of(model.decoder) == "sdpa"  # the model's own setting is restored
    with timing.decoder_attn(model, attn), eager_attention_calls() as calls:
        prompt.plain()
    assert bool(calls) == (fast == "eager")


def test_requested_attention_is_what_the_rows_say_ran(tmp_path):
    argv = [*TINY.split(), "--contexts", "64", "--k", "16", "--attn", "eager"]
    with eager_attention_calls() as calls:
        (row,) = ttft.main([*argv, "--baseline-attn", "sdpa", "--json", str(tmp_path / "t.json")])
    assert (row["attn"], row["encoder_attn"], row["baseline_attn"]) == ("eager", "eager", "sdpa")
    assert {"llama", "bert"} <= set(calls)


def test_context_must_divide_by_k():
    with pytest.raises(SystemExit):
        ttft.parse_args(["--contexts", "100", "--k", "16"])


def test_shape_overrides_reach_the_config():
    config = shapes.shape_config(
        "llama2-7b:num_hidden_layers=2,rope_theta=5e5", shapes.DECODER_SHAPES, 16448
    )
    assert (config.hidden_size, config.num_hidden_layers, config.max_position_embeddings) == (
        4096,
        2,
        16448,
    )


@pytest.mark.slow
def test_default_models_run_sdpa_and_report_their_settings(tmp_path):
    if not (ROOT / "resources/models/smollm2-135m-instruct/model.safetensors").is_file():
        pytest.skip("run `refrag fetch-models` first")
    argv = "--device cpu --contexts 256 --k 16 --quiet --repeats 1 --warmup 0 --new-tokens 2"
    with eager_attention_calls() as calls:
        (row,) = ttft.main([*argv.split(), "--json", str(tmp_path / "t.json")])
    assert (row["attn"], row["encoder_attn"]) == ("sdpa", "sdpa")
    assert set(row["baseline_candidates_ms"]) == {"sdpa", "eager"}
    assert row["baseline_attn"] in {"sdpa", "eager"}
    assert row["decoder"] == "embedded:smollm2-135m-instruct"
    # eager attention ran only for the eager baseline candidate (30 decoder layers per call)
    assert "bert" not in calls and len(calls) % 30 == 0 and calls


def noise_row(**extra) -> dict:
    row = {"baseline_spread": 0.05, "cached_spread": 0.1, "recomputed_spread": 0.02}
    return row | {"refrag_cached_ms": 100.0, "refrag_recomputed_ms": 300.0, "load_avg": 1.0} | extra


def test_a_row_is_noisy_when_its_repeats_spread_cached_beats_recomputed_or_the_load_is_high():
    assert ttft.noise_reasons(noise_row(), 0.3, 2) == []
    assert ttft.noise_reasons(noise_row(baseline_spread=0.6), 0.3, 2) == [
        "baseline repeats spread 60% > 30%"
    ]
    slow = ttft.noise_reasons(
        noise_row(refrag_cached_ms=5256.0, refrag_recomputed_ms=1288.0), 0.3, 2
    )
    assert slow == ["cached (5256 ms) slower than recomputed (1288 ms)"]
    assert ttft.noise_reasons(noise_row(load_avg=7.9), 0.3, 2) == ["load average 7.9 on 2 cores"]
    # the benchmark's own two threads on a quiet 2-core machine: not noise
    assert ttft.noise_reasons(noise_row(load_avg=2.3), 0.3, 2) == []
    assert ttft.spread([90.0, 100.0, 130.0]) == pytest.approx(0.4)


def test_a_noisy_context_is_measured_again_and_the_cleaner_attempt_kept(monkeypatch, capsys):
    attempts = iter(
        [[{"k": 8, "noise": ["x"]}], [{"k": 8, "noise": []}], [{"k": 8, "noise": ["y"]}]]
    )
    monkeypatch.setattr(ttft, "measure_context", lambda *a: next(attempts))
    args = type("Args", (), {"remeasure": 2})()
    rows = ttft.measure_until_clean(None, 64, None, None, args)
    assert rows == [{"k": 8, "noise": [], "attempts": 2}]
    assert "measuring again" in capsys.readouterr().err
    monkeypatch.setattr(ttft, "measure_context", lambda *a: [{"k": 8, "noise": ["z"]}])
    args.remeasure = 0
    assert ttft.measure_until_clean(None, 64, None, None, args)[0]["attempts"] == 1


def test_rows_report_the_spread_of_their_repeats_and_their_noise(tiny_rows):
    rows, _, _ = tiny_rows
    for r in rows:
        assert {"baseline_spread", "cached_spread", "recomputed_spread"} <= r.keys()
        assert isinstance(r["noise"], list) and r["attempts"] >= 1


def test_rows_time_both_decodes_with_the_same_machinery_read_from_the_objects(tiny_rows):
    rows, _, _ = tiny_rows
    for row in rows:
        assert row["ttit_machinery"] == "DynamicCache, eager"  # both sides, on a CPU
        assert row["baseline_ttit_ms"] > 0 and row["refrag_ttit_ms"] > 0
        assert row["ttit_graph_machinery"] == "not measured (no CUDA)"
        assert row["baseline_ttit_graph_ms"] is None and row["refrag_ttit_graph_ms"] is None
        assert row["environment"]["torch"] == torch.__version__


def test_a_side_whose_decode_machinery_differs_gets_no_ttit():
    ttit = {
        ("eager", "baseline", 0): (2.0, "DynamicCache, eager"),
        ("eager", "refrag", 16): (1.0, "DynamicCache, eager"),
        ("graph", "baseline", 0): (None, "CUDA-graph capture failed"),
        ("graph", "refrag", 16): (0.5, "StaticCache + CUDA-graph replay"),
    }
    cols = timing.ttit_columns(ttit, 16, 100.0, 10.0, 3)
    assert (cols["baseline_ttit_ms"], cols["refrag_ttit_ms"]) == (2.0, 1.0)
    assert cols["baseline_ttit_graph_ms"] is None and cols["refrag_ttit_graph_ms"] is None
    assert cols["ttit_graph_machinery"].startswith("differs: baseline CUDA-graph capture failed")
    assert cols["refrag_tokens_per_s"] == round(3 / ((10.0 + 2 * 1.0) / 1000), 2)


@pytest.fixture(scope="module")
def shaped_model() -> RefragModel:
    """The LLaMA-2-7B and RoBERTa-large shapes (their head counts, norms, activations) with
    one layer each and small widths: the ops per layer do not depend on the widths."""
    small = "num_hidden_layers=1,vocab_size=512,intermediate_size=128,hidden_size=128"
    args = ttft.parse_args(
        [
            *TINY.split(),
            *("--decoder-shape", f"llama2-7b:{small}"),
            *("--encoder-shape", f"roberta-large:{small}"),
            *("--contexts", "256", "--k", "8"),
        ]
    )
    return shapes.build_model(args, torch.device("cpu"), torch.float32)


def prefill_op_counts(model: RefragModel, x: dict) -> list:
    """Top-level ATen ops of one cached and one recomputed eager prefill of ``x``."""
    cache = ChunkEmbeddingCache(max_entries=None)
    cache.encode(model, x["rows"], x["row_mask"])
    chunks = {"chunk_mask": x["chunk_mask"]}

    def cached():
        embeds = cache.encode(model, x["rows"], x["row_mask"])
        prefill(model, x["ids"], chunk_embeds=embeds, **chunks)

    def recomputed():
        rows = {"chunk_input_ids": x["rows"], "chunk_attention_mask": x["row_mask"]}
        prefill(model, x["ids"], **chunks, **rows)

    with torch.inference_mode():
        return [profile.profile_call(fn).ops for fn in (cached, recomputed)]


def test_a_prefill_launches_as_many_ops_for_8_chunks_as_for_128_and_no_cache_copies(
    shaped_model,
):
    model, gen = shaped_model, torch.Generator().manual_seed(0)
    counts = {
        s // k: prefill_op_counts(model, timing.make_inputs(model, s, k, 16, gen))
        for s, k in ((64, 8), (256, 4), (512, 4))
    }
    assert counts[8] == counts[64] == counts[128]  # per op name, cached and recomputed
    cached = counts[8][0]
    # one cat for the rotary table, two per layer in rotate_half; none from the KV cache
    assert cached["aten::cat"] == 1 + 2 * model.config.decoder.num_hidden_layers
    assert sum(cached.values()) < 130  # 1 layer: 61 per layer + 62 around them, measured
