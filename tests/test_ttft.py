"""The TTFT benchmark's command line, JSON rows and plot, on tiny random shapes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ttft():
    spec = importlib.util.spec_from_file_location("bench_ttft", ROOT / "benchmarks" / "ttft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_ttft"] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_writes_rows_and_plot_for_every_context_and_k(ttft, tmp_path, capsys):
    out, fig = tmp_path / "bench" / "ttft.json", tmp_path / "bench" / "ttft.png"
    args = "--device cpu --decoder-shape tiny --encoder-shape tiny --contexts 64,128 --k 8,16"
    args += " --repeats 1 --warmup 0 --new-tokens 3 --quiet"
    ttft.main([*args.split(), "--json", str(out), "--plot", str(fig)])
    rows = json.loads(out.read_text())
    assert [(r["context"], r["k"]) for r in rows] == [(64, 8), (64, 16), (128, 8), (128, 16)]
    for r in rows:
        assert set(ttft.ROW_KEYS) <= set(r)
        assert r["refrag_positions"] == 1 + r["context"] // r["k"] + 16
        assert r["baseline_positions"] == 1 + r["context"] + 16
        assert r["speedup_cached"] == pytest.approx(
            r["baseline_ms"] / r["refrag_cached_ms"], rel=1e-2
        )
        assert r["decoder"] == "shape:tiny" and r["dtype"] == "float32"
    assert fig.stat().st_size > 0
    assert "x cached" in capsys.readouterr().out


def test_shape_overrides_and_the_paper_limit(ttft):
    config = ttft.shape_config(
        "llama2-7b:num_hidden_layers=2,rope_theta=5e5", ttft.DECODER_SHAPES, 16448
    )
    assert (config.hidden_size, config.num_hidden_layers, config.max_position_embeddings) == (
        4096,
        2,
        16448,
    )
    assert ttft.analytic_limit(16, 4096, 16384) == pytest.approx(25.6, abs=0.05)
    assert ttft.analytic_limit(32, 4096, 16384) == pytest.approx(52.2, abs=0.1)


def test_context_must_divide_by_k(ttft):
    with pytest.raises(SystemExit):
        ttft.parse_args(["--contexts", "100", "--k", "16"])


@pytest.mark.slow
def test_default_models_on_cpu_are_much_faster_cached(ttft, tmp_path):
    if not (ROOT / "resources/models/smollm2-135m-instruct/model.safetensors").is_file():
        pytest.skip("run `refrag fetch-models` first")
    args = ["--device", "cpu", "--contexts", "2048", "--k", "16", "--quiet", "--repeats", "1"]
    args += ["--warmup", "0", "--new-tokens", "2"]
    (row,) = ttft.main([*args, "--json", str(tmp_path / "t.json")])
    assert row["speedup_cached"] > 5  # ≥ 10× on an idle machine; loose for shared CI runners
    assert row["speedup_cached"] > row["speedup_recomputed"]
