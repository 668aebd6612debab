import json
import shutil
import subprocess

import matplotlib.axes
import pandas as pd
import pytest
import torch
from PIL import Image

from refrag.eval.tables import compact, sig3, with_interval
from refrag.report import (
    plot_perplexity,
    plot_training,
    plot_ttft,
    stage_order,
    write_report,
    write_ttft_table,
)
from refrag.report.document import headline, table1
from refrag.report.plots import PANEL_SIZE

from .conftest_profiles import unavailable

PNG = b"\x89PNG"


def perplexity_csv(path, intervals=True):
    base = {"decoder": "d", "encoder": "e", "eval_set": "test", "n_tokens": 80}
    rows = [
        base | {"variant": "no_context", "k": None, "log_ppl": 3.0},
        base | {"variant": "full_context", "k": None, "log_ppl": 2.0},
        base | {"variant": "full_context_encoder_text", "k": None, "log_ppl": 2.3},
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


def test_training_panels_are_one_per_stage_two_per_row_each_full_size(tmp_path, monkeypatch):
    """Each stage's panel (and its held-out curve, right after it) keeps PANEL_SIZE, however
    many stages there are: the figure grows in rows of two, never squeezes the panels."""
    losses = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    curve = [
        {"step": s, "heldout_retained": r, "heldout_tokens_seen": 96 * s, "heldout_windows": 4}
        for s, r in ((0, -0.1), (2, 0.3))
    ]
    folders = []
    for stage in ("sft", "cpt", "align", "reconstruct"):
        folder = tmp_path / stage
        folder.mkdir()
        history = losses + (curve if stage == "cpt" else [])
        (folder / "training_log.json").write_text(
            json.dumps({"stage": stage, "log_history": history})
        )
        folders.append(("d / e / k8", folder))
    titles = []
    set_title = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(
        "matplotlib.axes.Axes.set_title",
        lambda ax, label, **kw: titles.append(label) or set_title(ax, label, **kw),
    )
    image = Image.open(plot_training(folders, tmp_path / "training.png"))
    assert [t.split(":")[0] for t in titles] == ["align", "reconstruct", "cpt", "cpt", "sft"]
    assert "held-out" in titles[3]
    dpi = 110
    assert image.size == (2 * PANEL_SIZE[0] * dpi, 3 * PANEL_SIZE[1] * dpi)


def test_tables_print_three_significant_figures_with_their_interval():
    assert with_interval(0.308123, 0.2361, 0.37649) == "0.308 [0.236, 0.376]"
    assert with_interval(3.8612, None, None) == "3.86" and sig3(float("nan")) == ""
    assert sig3(1536) == "1,536" and sig3(24) == "24"
    frame = pd.DataFrame(
        [{"variant": "refrag", "log_ppl": 3.58123, "log_ppl_lo": 3.3421, "log_ppl_hi": 3.7801}]
    )
    assert compact(frame).to_dict("records") == [
        {"variant": "refrag", "log_ppl": "3.58 [3.34, 3.78]"}
    ]


def qa_frame():
    base = {"decoder": "d", "encoder": "e", "eval_set": "test", "n_documents": 12}
    base |= {"n_choice_questions": 168, "exact_match": 0.0, "f1": 0.1}
    return pd.DataFrame(
        [
            base
            | {"variant": "no_context", "k": None, "sft": False, "choice_accuracy": 0.3}
            | {"choice_gain": 0.0, "choice_gain_lo": 0.0, "choice_gain_hi": 0.0},
            base
            | {"variant": "full_context", "k": None, "sft": False, "choice_accuracy": 0.8}
            | {"choice_gain": 0.5, "choice_gain_lo": 0.41, "choice_gain_hi": 0.58},
            base
            | {"variant": "refrag_rl", "k": 16, "sft": False, "p": 0.25, "choice_accuracy": 0.4}
            | {"choice_gain": 0.1, "choice_gain_lo": 0.02, "choice_gain_hi": 0.2},
            base
            | {"variant": "refrag", "k": 16, "sft": True, "choice_accuracy": 0.5}
            | {"choice_gain": 0.2, "choice_gain_lo": 0.1, "choice_gain_hi": 0.3},
        ]
    )


def test_the_headline_says_each_result_with_its_interval_and_what_it_was_measured_on(tmp_path):
    table = pd.read_csv(perplexity_csv(tmp_path / "p.csv"))
    table = table.assign(retained_lo=0.1, retained_hi=0.9, n_windows=24, n_documents=12)
    ttft = pd.DataFrame(ttft_rows(16)).assign(analytic_limit=21.8, noise=["[]", "['load']"])
    lines = headline(table, qa_frame(), ttft)
    assert "24 windows of 12 documents" in lines[0] and "k=16: 0.6 [0.1, 0.9]" in lines[0]
    assert "base decoder (168 questions from 12 test documents" in lines[1]
    assert "the passage as tokens gains 0.5 [0.41, 0.58]" in lines[1] and "REFRAG" not in lines[1]
    assert "the policy (k=16, p=0.25) gains 0.1 [0.02, 0.2]" in lines[1]
    assert "after SFT" in lines[2] and "REFRAG k=16 gains 0.2 [0.1, 0.3]" in lines[2]
    assert "TTFT" in lines[3] and "NOISY" in lines[3]


def test_table_one_has_a_row_per_method_and_a_column_per_eval_set(tmp_path):
    table = pd.read_csv(perplexity_csv(tmp_path / "p.csv"))
    main = table1(table)
    assert list(main["method"]) == [
        "no_context",
        "full_context",
        "full_context_encoder_text",
        "refrag k=8",
        "refrag k=16",
        "refrag k=32",
    ]
    assert main.iloc[0]["test log-ppl"] == "3 [2.9, 3.2]"


def written_report(tmp_path):
    csv = perplexity_csv(tmp_path / "perplexity.csv")
    figure = plot_perplexity(csv, tmp_path / "perplexity.png")
    (tmp_path / "ttft.json").write_text(json.dumps(ttft_rows(16)))
    ttft_png = plot_ttft(tmp_path / "ttft.json", tmp_path / "ttft.png")
    write_ttft_table([({}, tmp_path / "ttft.json")], tmp_path / "t.json", tmp_path / "ttft.csv")
    qa = tmp_path / "qa.csv"
    qa_frame().to_csv(qa, index=False)
    out = tmp_path / "report.html"
    write_report(
        perplexity_csv=csv,
        ttft_csv=tmp_path / "ttft.csv",
        qa_csv=qa,
        figures={"Log-perplexity vs compression": figure, "TTFT": ttft_png},
        dag_svg=None,
        html_out=out,
        md_out=tmp_path / "report.md",
    )
    return out


def test_the_report_opens_with_the_headline_and_ends_with_hardware_and_versions(tmp_path):
    html = written_report(tmp_path).read_text()
    assert html.index("class='headline'") < html.index("Table 1") < html.index("every row")
    assert "Hardware and versions" in html and f"torch: {torch.__version__}" in html


def test_the_report_renders_in_a_headless_browser(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        unavailable("chromium is not installed (apt-get install chromium)")
    report = written_report(tmp_path)
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    run = subprocess.run(
        [browser, *flags, "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Table 1" in run.stdout and "Hardware and versions" in run.stdout
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 2400)
    assert len(set(image.getdata())) > 20  # text, tables and figures were drawn, not a blank page
