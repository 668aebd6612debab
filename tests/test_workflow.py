"""The Snakemake workflow: DAG shape, config validation, partial reruns, torchrun, a real run.

Every test works in a copy of the workflow under a temporary folder, so it never touches the
repository's own results/. The end-to-end run uses tiny random-weight models with the real
default tokenizers and a small local text corpus, so it takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from refrag.train.stages import STAGES

from .conftest import ROOT, TEXT, save_tiny_model

MAIN_STAGES = ["align", "reconstruct", "cpt"]  # what the default eval.stages needs
AT_K16 = ["sft", "mixed", "policy"]  # and, at k = 16 (eval.qa.k, eval.selective.k), these

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
WORKFLOW_FILES = ["Snakefile", "workflow", "config", "profiles", "benchmarks", "local"]


def make_workspace(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = ROOT / name
        if src.is_symlink():
            (dest / name).symlink_to(src.readlink())
        elif src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    return dest


def snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: int = 1200
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def override(workdir: Path, values: dict) -> list[str]:
    """Command-line arguments that lay ``values`` over the config (as a user's --configfile)."""
    path = workdir / f"override-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["--configfile", str(path)]


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Rule → job count of a dry run (the 'Job stats' table)."""
    out = snakemake(workdir, "-n", *args).stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {
        m[1]: int(m[2])
        for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)
        if m[1] != "total"
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("wf"))


def test_default_dag_has_every_stage_once(workspace):
    jobs = planned_jobs(workspace, "--forceall", "eval_report")
    assert jobs == {
        "fetch_model": 3,  # decoder, its lower layers (the chunk encoder), the retriever
        "fetch_corpus": 1,
        "prepare_corpus": 1,
        "tokenize": 3,  # train, validation (the held-out curve), test
        "align_pairs": 1,
        "train": 3 * len(MAIN_STAGES) + len(AT_K16),  # k = 8, 16, 32
        "eval_baselines": 1,
        "heldout_baselines": 1,
        "eval_refrag": 3 * 2,
        "eval_selective": 1,
        "qa_set": 1,
        "eval_qa_baselines": 1,
        "eval_qa": 5,  # cpt (no SFT) at k = 8, 16, 32; sft and policy (refrag_rl) at k = 16
        "qa_table": 1,
        "perplexity_table": 1,
        "plot_perplexity": 1,
        "plot_training": 1,
        "bench_ttft": 1,
        "ttft_table": 1,
        "plot_ttft": 1,
        "rulegraph": 1,
        "build_index": 1,  # retrieval: the index, RAG at k = 16, its tables and plot
        "eval_rag": 1,
        "rag_table": 1,
        "plot_rag": 1,
        "eval_report": 1,
    }


def test_workflow_is_lint_clean_and_snakefmt_formatted(workspace):
    """No lint at all: every rule names the project's one environment (conda: and the global
    container:, for --sdm conda / apptainer)."""
    lint = snakemake(workspace, "--lint", "--nolock", check=False)
    titles = set(re.findall(r"^\s+\* (.+?):$", lint.stdout + lint.stderr, re.MULTILINE))
    assert titles == set(), titles
    assert "Congratulations" in lint.stdout + lint.stderr
    fmt = subprocess.run(
        [str(Path(sys.executable).parent / "snakefmt"), "--check", "Snakefile", "workflow/rules"],
        cwd=workspace,
        capture_output=True,
        text=True,
    )
    assert fmt.returncode == 0, fmt.stderr


def test_a_sweep_over_k_and_encoders_expands_into_jobs(workspace):
    runs = [{"decoder": "smollm2-135m-instruct", "encoder": "all-minilm-l6-v2", "k": [8, 16, 32]}]
    jobs = planned_jobs(
        workspace, "--forceall", "eval_report", *override(workspace, {"runs": runs})
    )
    assert jobs["train"] == 3 * len(MAIN_STAGES) + len(AT_K16)
    assert jobs["eval_refrag"] == 6 and jobs["align_pairs"] == 1 and jobs["eval_baselines"] == 1


def test_listing_the_frozen_decoder_ablation_trains_and_evaluates_it(workspace):
    stages = ["reconstruct", "cpt", "cpt_frozen"]
    eval_config = {"sets": ["test"], "stages": stages, "batch_size": 8}
    jobs = planned_jobs(
        workspace, "--forceall", "eval_report", *override(workspace, {"eval": eval_config})
    )
    assert jobs["train"] == 3 * (len(MAIN_STAGES) + 1) + len(AT_K16)
    assert jobs["eval_refrag"] == 3 * 3


def test_sft_data_named_in_the_config_is_an_input_of_the_sft_job(workspace, tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "Who?", "answer": "Babbage", "context": "Babbage."}\n')
    values = {"train": {"sft": {"data": str(questions)}}}
    out = snakemake(workspace, "-n", "--forceall", "eval_report", *override(workspace, values))
    sft_job = out.stdout.split("k16/sft\n", 1)[0].rsplit("rule train:", 1)[1]
    assert str(questions) in sft_job


@pytest.mark.parametrize(
    ("values", "key", "error"),
    [
        ({"data": {"context_tokens": 0}}, "context_tokens", "nothing was run"),
        ({"eval": {"sets": ["dev"]}}, "sets", "nothing was run"),
        ({"corpus": {"name": "a b", "source": "x"}}, "name", "nothing was run"),
        (
            {"runs": [{"decoder": "a", "encoder": "b", "k": [16], "learning_rate": 1}]},
            "learning_rate",
            "nothing was run",
        ),
        (
            {"runs": [{"decoder": "smollm2-135m-instruct", "encoder": "bert", "k": [16]}]},
            "runs[0].encoder",
            "is not a key of `models`",
        ),
        ({"hello_dist": {"nprocs": 2}}, "hello_dist.nprocs: unknown key", "nothing was run"),
        ({"retrieval": {"encoder": "bert"}}, "retrieval.encoder", "is not a key of `models`"),
    ],
)
def test_bad_config_fails_before_any_job_naming_the_key(workspace, values, key, error):
    result = snakemake(workspace, "-n", "eval_report", *override(workspace, values), check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert error in output and key in output


def test_environment_guard_names_the_setup_command(workspace, tmp_path):
    """Outside the project's environment the Snakefile stops with one line on how to set up."""
    # `refrag` shadowed by a package that fails to import, as in an environment without it
    shadow = tmp_path / "shadow"
    (shadow / "refrag").mkdir(parents=True)
    (shadow / "refrag" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {"PYTHONPATH": str(shadow), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [*SNAKEMAKE, "-n"], cwd=workspace, capture_output=True, text=True, env=env
    )
    assert result.returncode != 0
    assert "./setup.sh" in result.stdout + result.stderr


def test_hello_dist_runs_two_ranks_under_torchrun(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    snakemake(ws, "--cores", "2", "hello_dist")
    world = json.loads((ws / "results/hello_dist/world.json").read_text())
    assert (
        world["world_size"] == 2 and world["backend"] == "gloo" and world["all_reduce_sum"] == 3.0
    )
    for rank in (0, 1):
        log = (ws / f"logs/hello_dist/ranks/run-{rank}.log").read_text()
        assert f"hello from rank {rank}/2" in log


# --- a real run on tiny models ---------------------------------------------------------------


def tiny_model_folders(root: Path, decoder_dir: Path, encoder_dir: Path) -> dict[str, str]:
    """Random-weight encoder/decoder folders with the default models' real tokenizers."""
    return {
        "tiny-decoder": str(save_tiny_model("decoder", root / "tiny-decoder", decoder_dir)),
        "tiny-encoder": str(save_tiny_model("encoder", root / "tiny-encoder", encoder_dir)),
        "tiny-encoder-b": str(save_tiny_model("encoder", root / "tiny-encoder-b", encoder_dir)),
    }


def tiny_corpus(folder: Path) -> str:
    """Sixteen text documents of real text: the module sources of transformers' model files,
    each 1,500 characters of code after a paragraph of English prose (the QA questions and the
    SFT data are sentences of prose with a name or number in them)."""
    import transformers.models as models

    folder.mkdir(parents=True)
    sources = sorted(Path(models.__file__).parent.glob("*/modeling_*.py"))[:16]
    sentences = TEXT.split(". ")[:5]
    for i, src in enumerate(sources):
        code = src.read_text()[:15000]
        parts = []
        for j in range(0, len(code), 1500):
            prose = sentences[(i + j) % 5 :] + sentences[: (i + j) % 5]
            parts += [". ".join(prose) + ".", code[j : j + 1500]]
        (folder / f"doc{i:02d}.txt").write_text("\n\n".join(parts))
    return str(folder)


def tiny_workspace(
    root: Path,
    decoder_dir: Path,
    encoder_dir: Path,
    *,
    runs: list[dict],
    windows: int,
    steps: int,
    context_tokens: int = 32,
    selective_and_qa_k: list[int] = (),
) -> Path:
    """A copy of the workflow under root/work, configured for the tiny models and corpus:
    (``context_tokens`` + 8)-token windows, ``windows`` train windows, ``steps`` steps per
    stage; selective compression and QA at ``selective_and_qa_k`` (default: neither)."""
    ws = make_workspace(root / "work")
    config = yaml.safe_load((ws / "config/config.yaml").read_text())
    config["models"] = tiny_model_folders(root / "models", decoder_dir, encoder_dir)
    config["corpus"] = {
        "name": "tiny",
        "source": tiny_corpus(root / "corpus"),
        "validation_fraction": 0.2,
        "test_fraction": 0.25,
        "min_chars": 1000,
    }
    config["runs"] = runs
    config["data"] = {
        "context_tokens": context_tokens,
        "target_tokens": 8,
        "max_windows": {"train": windows, "validation": 8, "test": windows // 4},
    }
    small = {"steps": steps, "batch_size": 4, "save_steps": 2, "logging_steps": 1}
    config["train"] = dict.fromkeys(STAGES, small)
    config["eval"]["selective"]["k"] = list(selective_and_qa_k)
    config["eval"]["qa"] |= {"k": list(selective_and_qa_k), "max_new_tokens": 4}
    config["bench"] = {"device": "cpu", "contexts": [256], "k": [8], "repeats": 1}
    config["retrieval"] = {
        "encoder": "tiny-encoder",  # random weights: the plumbing, not the retrieval
        "passage_words": 64,
        "recall_n": [1, 5],
        "rag": {
            "k": list(selective_and_qa_k),
            "questions": 4,
            "tokens_n": [1, 2],
            "refrag_n": [1, 2, 4],
            "ttft_questions": 1,
            "ttft_repeats": 1,
        },
    }
    (ws / "config/config.yaml").write_text(yaml.safe_dump(config))
    return ws


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, decoder_dir, encoder_dir) -> Path:
    runs = [{"decoder": "tiny-decoder", "encoder": "tiny-encoder", "k": [4, 8]}]
    ws = tiny_workspace(
        tmp_path_factory.mktemp("e2e"),
        decoder_dir,
        encoder_dir,
        runs=runs,
        windows=64,
        steps=4,
        context_tokens=96,
        selective_and_qa_k=[4],
    )
    snakemake(ws, "--profile", "local", "--cores", "2", "eval_report")
    return ws


@pytest.mark.slow
def test_end_to_end_run_writes_the_report_and_the_fixed_outputs(finished_run):
    table = pd.read_csv(finished_run / "results/eval/perplexity.csv")
    assert {"variant", "k", "eval_set", "log_ppl", "context_benefit_retained"} <= set(table.columns)
    assert {"log_ppl_lo", "log_ppl_hi", "retained_lo", "retained_hi", "positions"} <= set(
        table.columns
    )
    assert set(table["variant"]) == {
        "no_context",
        "full_context",
        "full_context_encoder_text",
        "refrag",
        "refrag_reconstruct",
        "refrag_rl",
        "refrag_random",
        "refrag_heuristic",
    }
    assert table["n_tokens"].nunique() == 1 and (table["log_ppl_lo"] <= table["log_ppl"]).all()
    assert sorted(table.loc[table["variant"] == "refrag", "k"]) == [4, 8]
    assert table["log_ppl"].notna().all()
    report = (finished_run / "results/report.html").read_text()
    assert (
        "<svg" in report
        and "data:image/png;base64" in report
        and "context_benefit_retained" in report
    )
    assert (finished_run / "results/dag.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert (finished_run / "results/report.md").exists()
    for plot in ("perplexity", "training", "ttft"):
        assert (finished_run / f"results/plots/{plot}.png").read_bytes().startswith(b"\x89PNG")
    ttft = pd.read_csv(finished_run / "results/bench/ttft.csv")
    assert set(ttft["encoder"]) == {"tiny-encoder"} and (ttft["speedup_cached"] > 0).all()
    shards = json.loads(
        (
            finished_run / "results/shards/tiny/tiny-decoder/tiny-encoder/train/manifest.json"
        ).read_text()
    )
    assert shards["rows"] > 0 and shards["decoder_tokenizer"]["vocab_size"] == 49152
    log = json.loads(
        (
            finished_run
            / "results/checkpoints/tiny/tiny-decoder/tiny-encoder/k4/cpt/training_log.json"
        ).read_text()
    )
    assert log["stage"] == "cpt" and any("loss" in entry for entry in log["log_history"])
    assert not list(finished_run.glob("results/checkpoints/**/*.work"))


@pytest.mark.slow
def test_end_to_end_run_trains_sft_and_the_policy_and_evaluates_qa_and_selective(finished_run):
    table = pd.read_csv(finished_run / "results/eval/perplexity.csv")
    selective = table[table["variant"].str.fullmatch("refrag_(rl|random|heuristic)")]
    assert len(selective) == 3 and set(selective["p"]) == {0.25} and set(selective["k"]) == {4}
    refrag = table[(table["variant"] == "refrag") & (table["k"] == 4)]["positions"].item()
    assert (selective["positions"] > refrag).all()  # expanded chunks take their tokens
    assert (selective["compression"] < 96 / refrag).all()
    qa = pd.read_csv(finished_run / "results/eval/qa.csv")
    ks = [None if pd.isna(k) else int(k) for k in qa["k"]]
    assert list(zip(qa["variant"], ks, qa["sft"])) == [
        ("no_context", None, False),
        ("full_context", None, False),
        ("refrag", 4, False),  # before SFT at every k the run trains
        ("refrag", 8, False),
        ("refrag_rl", 4, False),  # the policy stage's, expanding p = 0.25 of the chunks
        ("no_context", 4, True),  # the k = 4 run's SFT checkpoint reads all three ways
        ("full_context", 4, True),
        ("refrag", 4, True),
    ]
    assert qa.loc[qa["variant"] == "refrag_rl", "p"].tolist() == [0.25]
    assert qa.loc[qa["variant"] != "refrag_rl", "p"].isna().all()
    assert qa["n_questions"].nunique() == 1 and qa["n_questions"].iloc[0] > 0
    assert ((qa["exact_match_lo"] <= qa["exact_match"]) & (qa["f1"] <= qa["f1_hi"])).all()
    questions = (finished_run / "results/qa/tiny/tiny-decoder/tiny-encoder/test.jsonl").read_text()
    assert len(questions.splitlines()) == qa["n_questions"].iloc[0]
    k4 = finished_run / "results/checkpoints/tiny/tiny-decoder/tiny-encoder/k4"
    policy_log = json.loads((k4 / "policy/training_log.json").read_text())
    assert any("reward" in entry for entry in policy_log["log_history"])
    assert json.loads((k4 / "policy/config.json").read_text())["policy"]
    assert json.loads((k4 / "sft/training_log.json").read_text())["stage"] == "sft"
    assert "Question answering" in (finished_run / "results/report.html").read_text()


@pytest.mark.slow
def test_end_to_end_run_retrieves_and_compares_rag_at_equal_latency(finished_run):
    recall = pd.read_csv(finished_run / "results/eval/retrieval.csv")
    assert list(recall["n"]) == [1, 5] and (recall["index_passages"] > 0).all()
    assert (recall["recall_document"] >= recall["recall_answer"]).all()
    rag = pd.read_csv(finished_run / "results/eval/rag.csv")
    assert list(zip(rag["variant"], rag["n"])) == [
        ("no_context", 0),
        ("full_context", 1),
        ("refrag", 1),
        ("full_context", 2),
        ("refrag", 2),
        ("refrag", 4),
    ]
    assert (rag["n_questions"] == 4).all() and (rag["ttft_ms"] > 0).all()
    assert set(rag["stage"]) == {"sft"} and set(rag["k"]) == {4}
    assert (finished_run / "results/plots/rag.png").read_bytes().startswith(b"\x89PNG")
    report = (finished_run / "results/report.html").read_text()
    assert "Retrieval recall@n" in report and "RAG at equal latency" in report
    assert (finished_run / "results/index/tiny/tiny-encoder/integrity.json").exists()


@pytest.mark.slow
def test_nothing_reruns_without_a_change(finished_run):
    assert planned_jobs(finished_run, "eval_report") == {}


@pytest.mark.slow
def test_changing_an_eval_value_reruns_only_evaluation_and_report(finished_run):
    config = yaml.safe_load((finished_run / "config/config.yaml").read_text())
    jobs = planned_jobs(
        finished_run,
        "eval_report",
        *override(finished_run, {"eval": config["eval"] | {"batch_size": 3}}),
    )
    assert jobs == {
        "eval_baselines": 1,
        "eval_refrag": 4,
        "perplexity_table": 1,
        "plot_perplexity": 1,
        "rulegraph": 1,  # redrawn for any config change
        "eval_report": 1,
    }


@pytest.mark.slow
def test_changing_a_stage_hyperparameter_reruns_that_stage_onward(finished_run):
    config = yaml.safe_load((finished_run / "config/config.yaml").read_text())
    train = config["train"] | {"cpt": config["train"]["cpt"] | {"lr": 1e-5}}
    jobs = planned_jobs(finished_run, "eval_report", *override(finished_run, {"train": train}))
    assert jobs == {
        "train": 2 + len(AT_K16),  # cpt at k = 4 and 8, and what starts from cpt at k = 4
        "eval_refrag": 2,
        "eval_selective": 1,
        "eval_qa": 4,  # cpt at k = 4 and 8 (no SFT), sft and policy at k = 4
        "qa_table": 1,
        "eval_rag": 1,  # it reads the sft checkpoint at k = 4
        "rag_table": 1,
        "plot_rag": 1,
        "perplexity_table": 1,
        "plot_perplexity": 1,
        "plot_training": 1,
        "rulegraph": 1,
        "eval_report": 1,
    }


@pytest.mark.slow
def test_changing_the_encoder_reruns_alignment_onward_but_not_the_corpus(finished_run):
    runs = [{"decoder": "tiny-decoder", "encoder": "tiny-encoder-b", "k": [4, 8]}]
    jobs = planned_jobs(finished_run, "eval_report", *override(finished_run, {"runs": runs}))
    assert "prepare_corpus" not in jobs and "fetch_corpus" not in jobs
    assert jobs["fetch_model"] == 1 and jobs["tokenize"] == 3 and jobs["align_pairs"] == 1
    assert jobs["train"] == 2 * len(MAIN_STAGES) + len(AT_K16) and jobs["bench_ttft"] == 1
    assert jobs["heldout_baselines"] == 1  # the held-out curve's, for the new pair


@pytest.mark.slow
def test_snakemake_report_carries_every_table_and_plot(finished_run):
    result = snakemake(finished_run, "--report", "results/snakemake-report.zip")
    assert "max() arg is an empty sequence" not in result.stderr
    import zipfile

    with zipfile.ZipFile(finished_run / "results/snakemake-report.zip") as report:
        names = "\n".join(report.namelist())
    for output in (
        "perplexity.csv",
        "qa.csv",
        "rag.csv",
        "retrieval.csv",
        "rag.png",
        "perplexity.png",
        "training.png",
        "ttft.csv",
        "ttft.png",
        "dag.svg",
        "report.html",
    ):
        assert output in names, (output, names)


@pytest.mark.slow
def test_the_dag_is_drawn_from_the_runs_own_config(tmp_path):
    """An override that changes the DAG (an embedded corpus needs fetch_corpus, a local folder
    does not) reaches the rule graph drawn inside the job."""
    ws = make_workspace(tmp_path / "ws")
    local = {"corpus": {"name": "local", "source": tiny_corpus(tmp_path / "corpus")}}
    snakemake(ws, "--cores", "1", "results/dag.svg", *override(ws, local))
    assert "fetch_corpus" not in (ws / "results/dag.svg").read_text()
    snakemake(ws, "--cores", "1", "results/dag.svg")
    assert "fetch_corpus" in (ws / "results/dag.svg").read_text()
