import json

import pandas as pd
import pytest

from refrag.report import (
    plot_perplexity,
    plot_training,
    plot_ttft,
    stage_order,
    write_report,
    write_ttft_table,
)

PNG = b"\x89PNG"


def perplexity_csv(path, intervals=True):
    base = {"decoder": "d", "encoder": "e", "eval_set": "test", "n_tokens": 80}
    rows = [
        base | {"variant": "no_context", "k": None, "log_ppl": 3.0},
        base | {"variant": "full_context", "k": None, "log_ppl": 2.0},
        base | {"variant": "full_context_lowercase", "k": None, "log_ppl": 2.3},
        base | {"variant": "refrag", "k": 8, "log_ppl": 2.2, "context_benefit_retained": 0.8},
        base | {"variant": "refrag", "k": 16, "log_ppl": 2.4, "context_benefit_retained": 0.6},
        base | {"variant": "refrag", "k": 32, "log_ppl": 2.7, "context_benefit_retained": 0.3},
    ]
    if intervals:
        for row in rows:
            row |= {"log_ppl_lo": row["log_ppl"] - 0.1, "log_ppl_hi": row["log_ppl"] + 0.2}
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_perplexity_plot_draws_intervals_against_k(tmp_path, monkeypatch):
    import matplotlib.axes

    calls = []
    original = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, yerr=None, **kwargs):
        calls.append((list(x), yerr))
        return original(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    out = plot_perplexity(perplexity_csv(tmp_path / "p.csv"), tmp_path / "p.png")
    assert out.read_bytes().startswith(PNG)
    (x, (below, above)), *_ = calls
    assert x == [8, 16, 32]
    assert list(below) == pytest.approx([0.1] * 3) and list(above) == pytest.approx([0.2] * 3)
    calls.clear()
    plot_perplexity(perplexity_csv(tmp_path / "q.csv", intervals=False), tmp_path / "q.png")
    assert calls[0][1] is None  # a table without intervals still plots, without error bars


def ttft_rows(k):
    return [
        {
            "decoder": "resources/models/dec",
            "context": s,
            "k": k,
            "baseline_ms": 10.0,
            "refrag_cached_ms": 2.0,
        }
        | {"refrag_recomputed_ms": 4.0, "speedup_cached": 5.0, "speedup_recomputed": 2.5}
        for s in (256, 512)
    ]


def test_ttft_benchmarks_merge_with_their_labels(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps(ttft_rows(8)))
    labels = [{"decoder": "dec", "encoder": name} for name in ("a", "b")]
    table = write_ttft_table(
        list(zip(labels, [tmp_path / "a.json", tmp_path / "b.json"])),
        json_out=tmp_path / "ttft.json",
        csv_out=tmp_path / "ttft.csv",
    )
    assert list(table["encoder"]) == ["a", "a", "b", "b"]
    assert json.loads((tmp_path / "ttft.json").read_text())[2]["encoder"] == "b"
    assert pd.read_csv(tmp_path / "ttft.csv").columns[:3].tolist() == [
        "decoder",
        "encoder",
        "context",
    ]
    assert plot_ttft(tmp_path / "ttft.json", tmp_path / "ttft.png").read_bytes().startswith(PNG)


def test_training_panels_follow_the_stage_registry(tmp_path):
    folders = []
    for stage in ("cpt", "align"):
        folder = tmp_path / stage
        folder.mkdir()
        history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
        (folder / "training_log.json").write_text(
            json.dumps({"stage": stage, "log_history": history})
        )
        folders.append(("d / e / k8", folder))
    out = plot_training(folders, tmp_path / "training.png")
    assert out.read_bytes().startswith(PNG)
    assert stage_order({"cpt", "zeta", "align"}) == ["align", "cpt", "zeta"]


def test_the_policy_panel_plots_its_reward(tmp_path, monkeypatch):
    folder = tmp_path / "policy"
    folder.mkdir()
    history = [{"step": s, "loss": 0.01 * s, "reward": -3.0 + 0.1 * s} for s in (2, 4, 6)]
    (folder / "training_log.json").write_text(
        json.dumps({"stage": "policy", "log_history": history})
    )
    drawn = {}
    monkeypatch.setattr("matplotlib.axes.Axes.plot", lambda ax, x, y, **kw: drawn.update(y=y))
    monkeypatch.setattr(
        "matplotlib.axes.Axes.set_ylabel", lambda ax, label, **kw: drawn.update(label=label)
    )
    plot_training([("d / e / k16", folder)], tmp_path / "training.png")
    assert drawn["y"] == (-2.8, -2.6, -2.4) and "reward" in drawn["label"]


def test_report_inlines_the_given_figures_and_links_them_in_markdown(tmp_path):
    csv = perplexity_csv(tmp_path / "perplexity.csv")
    plots = tmp_path / "plots"
    plots.mkdir()
    figure = plot_perplexity(csv, plots / "perplexity.png")
    (tmp_path / "ttft.json").write_text(json.dumps(ttft_rows(16)))
    write_ttft_table([({}, tmp_path / "ttft.json")], tmp_path / "t.json", tmp_path / "ttft.csv")
    out = tmp_path / "out"
    out.mkdir()
    qa = tmp_path / "qa.csv"
    pd.DataFrame(
        [{"variant": "refrag", "k": 16, "sft": True, "exact_match": 0.25, "f1": 0.5}]
    ).to_csv(qa, index=False)
    write_report(
        perplexity_csv=csv,
        ttft_csv=tmp_path / "ttft.csv",
        qa_csv=qa,
        figures={"Log-perplexity vs compression": figure},
        dag_svg=None,
        html_out=out / "report.html",
        md_out=out / "report.md",
        config={"runs": []},
    )
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "context_benefit_retained" in html
    assert "Time to first token" in html and "Configuration" in html
    assert "Question answering" in html and "exact_match" in html
    assert "](../plots/perplexity.png)" in (out / "report.md").read_text()


def test_a_held_out_curve_adds_a_row_of_panels(tmp_path):
    from PIL import Image

    def figure(history, name):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "training_log.json").write_text(
            json.dumps({"stage": "cpt", "log_history": history})
        )
        return Image.open(plot_training([("d / e / k8", folder)], tmp_path / f"{name}.png"))

    losses = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    curve = [
        {"step": s, "heldout_retained": r, "heldout_tokens_seen": 96 * s, "heldout_windows": 4}
        for s, r in ((0, -0.1), (2, 0.3))
    ]
    plain, with_curve = figure(losses, "plain"), figure(losses + curve, "curve")
    assert with_curve.height > 1.8 * plain.height and with_curve.width == plain.width
