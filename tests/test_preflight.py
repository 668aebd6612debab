"""The whole config is checked before the first job: one line per problem, naming the key."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refrag.io.models import ModelSpecError, fetch_model
from refrag.modeling.limits import compression_limit
from refrag.preflight import check_config
from refrag.train.stages import StageConfig, with_stage_schemas

from .conftest import ROOT

SCHEMA = with_stage_schemas(
    yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
)
DEFAULT = yaml.safe_load((ROOT / "config/config.yaml").read_text())


def config(**changes) -> dict:
    out = copy.deepcopy(DEFAULT)
    for dotted, value in changes.items():
        node, *path = out, *dotted.split("__")
        for key in path[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[path[-1]] = value
    return out


def check(cfg: dict, tmp_path) -> list[str]:
    return check_config(cfg, SCHEMA, cache_dir=tmp_path / "models")


def test_the_default_config_passes(tmp_path):
    assert check(config(), tmp_path) == []


def test_unknown_keys_anywhere_are_refused_one_line_each(tmp_path):
    cfg = config(hello_dist__nprocs=2)
    cfg["runs"][0]["train"] = {"cpt": {"lrr": 1e-3}}
    assert check(cfg, tmp_path) == [
        "config hello_dist.nprocs: unknown key (known here: nproc)",
        "config runs[0].train.cpt.lrr: unknown key (known here: "
        + ", ".join(sorted(StageConfig.__dataclass_fields__))
        + ")",
    ]


def test_numbers_yaml_reads_as_strings_are_accepted_as_numbers(tmp_path):
    cfg = config()
    cfg["train"]["cpt"] = yaml.safe_load("{lr: 1e-3, steps: 2e2}")
    assert cfg["train"]["cpt"]["lr"] == "1e-3"  # PyYAML (YAML 1.1) wants 1.0e-3
    assert check(cfg, tmp_path) == []
    assert cfg["train"]["cpt"]["lr"] == 0.001 and cfg["train"]["cpt"]["steps"] == 200


def test_selective_and_qa_k_must_be_trained_by_a_run(tmp_path):
    cfg = config(runs__0__k=[8, 16])
    cfg["eval"] |= {"selective": {"k": [16]}, "qa": {"k": [16, 12]}}
    assert check(cfg, tmp_path) == ["config eval.qa.k[1]: no run trains k=12 (runs' k: 8, 16)"]


def test_a_non_number_string_names_its_key(tmp_path):
    cfg = config()
    cfg["train"]["align"] = {"lr": "fast"}
    assert check(cfg, tmp_path) == ["config train.align.lr: 'fast' is not a number"]


def test_k_that_overflows_the_encoder_positions_is_named(tmp_path):
    minilm = {"runs__0__encoder": "all-minilm-l6-v2"}
    errors = check(config(runs__0__k=[16, 600], **minilm), tmp_path)
    assert errors == [
        "config runs[0].k[1]: k=600 does not fit encoder 'all-minilm-l6-v2': a chunk row is "
        "k + 2 tokens (CLS, SEP) and it has positions for 512; use k <= 510"
    ]
    assert check(config(runs__0__k=[16, 510], **minilm), tmp_path) == []


def test_the_default_layers_encoder_takes_k_up_to_the_decoders_positions(tmp_path):
    """The default encoder (the decoder's lower layers, not fetched yet) has the decoder's
    8,192 positions: its limit is the decoder's, read before anything is fetched (two
    positions kept for special tokens, as for every encoder)."""
    (error,) = check(config(runs__0__k=[16, 8191]), tmp_path)
    assert error.startswith("config runs[0].k[1]: k=8191 does not fit encoder")
    assert "'smollm2-135m-layers-4'" in error and "use k <= 8190" in error
    assert check(config(runs__0__k=[16, 8190]), tmp_path) == []


def test_k_limit_reads_a_local_encoder_and_knows_roberta_offsets(tmp_path, encoder_dir):
    cfg = config(runs__0__k=[16, 511], runs__0__encoder="all-minilm-l6-v2")
    cfg["models"]["all-minilm-l6-v2"] = str(encoder_dir)
    assert "runs[0].k[1]: k=511" in check(cfg, tmp_path)[0]
    assert compression_limit({"model_type": "roberta", "max_position_embeddings": 514}) == 510
    assert compression_limit({"model_type": "bert", "max_position_embeddings": 512}) == 510


@pytest.mark.parametrize(
    "spec, message",
    [
        ("embedded:no-such-model", "unknown embedded model 'no-such-model'"),
        ("hf:not a repo", "is not hf:<repo>[@revision]"),
        ("/no/such/folder", "nor a folder holding config.json"),
    ],
)
def test_model_specs_that_cannot_resolve_are_named(tmp_path, spec, message):
    cfg = config()
    cfg["models"]["all-minilm-l6-v2"] = spec
    (error,) = check(cfg, tmp_path)
    assert error.startswith("config models.all-minilm-l6-v2: ") and message in error


def test_runs_must_name_configured_models(tmp_path):
    assert check(config(runs__0__encoder="bert"), tmp_path) == [
        "config runs[0].encoder: 'bert' is not a key of `models` "
        "(smollm2-135m-instruct, smollm2-135m-layers-4, all-minilm-l6-v2)"
    ]


def test_a_bad_spec_never_deletes_the_model_folder_it_would_replace(tmp_path):
    out = tmp_path / "all-minilm-l6-v2"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(ModelSpecError):
        fetch_model("embedded:typo", out)
    with pytest.raises(ModelSpecError):
        fetch_model(str(tmp_path / "missing"), out)
    assert (out / "config.json").read_text() == "{}"


def test_corpus_problems_are_found_before_any_job(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("too short " * 10)
    assert check(config(corpus__source=str(tmp_path / "nowhere")), tmp_path) == [
        f"config corpus.source: {str(tmp_path / 'nowhere')!r} is not a folder "
        "(nor embedded:<name>, hf:<dataset>)"
    ]
    assert "holds no .txt" in check(config(corpus__source=str(empty)), tmp_path)[0]
    (error,) = check(config(corpus__source=str(short), corpus__min_chars=0), tmp_path)
    assert "no document" in error and "320 tokens" in error
    (short / "b.txt").write_text("long enough " * 40)
    assert check(config(corpus__source=str(short), corpus__min_chars=0), tmp_path) == []
    assert check(config(corpus__source="embedded:nope"), tmp_path)[0].startswith(
        "config corpus.source: unknown embedded corpus 'nope'"
    )


# -- properties ---------------------------------------------------------------------------------
def _objects(cfg: dict, path=()):  # every object of the config where the schema forbids extras
    for key, value in cfg.items():
        if isinstance(value, dict) and key != "models":
            yield (*path, key)
            yield from _objects(value, (*path, key))


OBJECT_PATHS = [()] + list(_objects(DEFAULT))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    where=st.sampled_from(OBJECT_PATHS),
    key=st.text(st.characters(codec="utf-8", categories=["L", "N", "Pc"]), min_size=1, max_size=12),
)
def test_any_unknown_key_in_any_object_gives_exactly_one_line_naming_it(where, key, tmp_path):
    cfg = config()
    node = cfg
    for part in where:
        node = node[part]
    if key in node:
        return
    node[key] = 1
    errors = check(cfg, tmp_path)
    dotted = ".".join([*where, key])
    assert errors == [errors[0]] and errors[0].startswith(f"config {dotted}: unknown key")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lr=st.floats(min_value=1e-12, max_value=10, allow_nan=False),
    fmt=st.sampled_from(["e", "g", "r"]),
)
def test_any_positive_number_written_as_a_string_is_read_as_that_number(lr, fmt, tmp_path):
    text = repr(lr) if fmt == "r" else format(lr, fmt)
    cfg = config()
    cfg["train"]["cpt"] = {"lr": text}
    assert check(cfg, tmp_path) == []
    assert cfg["train"]["cpt"]["lr"] == float(text)


# -- in the workflow ------------------------------------------------------------------------------
def test_snakemake_stops_before_any_job_with_one_line_per_config_error(tmp_path):
    for name in ("Snakefile", "workflow", "config"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    override = tmp_path / "bad.yaml"
    override.write_text(
        "hello_dist: {nprocs: 2}\nruns: [{decoder: smollm2-135m-instruct, "
        "encoder: all-minilm-l6-v2, k: [600]}]\ntrain:\n  align: {steps: 20, batch_size: 8, lr: 1e-3}\n"
        "  reconstruct: {steps: 30, batch_size: 8, lr: 2e-4}\n  cpt: {steps: 150, batch_size: 4, lr: 2e-4}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "eval_report", "--configfile", str(override)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines()]
    start = lines.index("refrag-workflow: config errors, nothing was run:")
    assert lines[start + 1 : start + 3] == [
        "config hello_dist.nprocs: unknown key (known here: nproc)",
        "config runs[0].k[0]: k=600 does not fit encoder 'all-minilm-l6-v2': a chunk row is "
        "k + 2 tokens (CLS, SEP) and it has positions for 512; use k <= 510",
    ]
    assert not any("lr" in line for line in lines)  # 1e-3 is read as a number
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


# -- a config file that does not parse is named with its line and column ---------------------
def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    from refrag.preflight import ConfigFileError, check_config_files, config_file_error

    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("runs:\n  - name: a\n    k: [16]\n")
    bad.write_text("runs:\n  - name: a\n   k: [16]\n")  # one space short
    assert config_file_error(good) is None
    assert config_file_error(ROOT / "config/config.yaml") is None
    message = config_file_error(bad)
    assert message.startswith(f"{bad}:3:4: ") and "\n" not in message
    with pytest.raises(ConfigFileError, match=rf"^{bad}:3:4: "):
        check_config_files([good, bad])
    tab = tmp_path / "tab.yaml"
    tab.write_text("a:\n\tb: 1\n")
    assert config_file_error(tab).startswith(f"{tab}:2:1: found character '\\t'")
    assert (
        config_file_error(tmp_path / "none.yaml")
        == f"{tmp_path / 'none.yaml'}: no such config file"
    )


def test_configfile_arguments_are_found_on_a_snakemake_command_line():
    from refrag.preflight import configfile_args

    argv = [
        "snakemake",
        "-n",
        "--configfile",
        "a.yaml",
        "b.yaml",
        "-j",
        "1",
        "--configfiles=c.yaml",
    ]
    assert configfile_args(argv) == ["a.yaml", "b.yaml", "c.yaml"]


def test_snakemake_names_a_broken_configfile_in_one_line(tmp_path):
    """The workflow profile runs refrag.cli.exit_on_config_file_errors before Snakemake parses
    the config files: file, line and column, one line, no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\nmodels: {a: b\n")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-n", "--configfile", str(bad)],
        env=os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("config:")]
    assert lines == [
        f"config: {bad}:3:1: expected ',' or '}}', but got '<stream end>' (while parsing a flow mapping)"
    ]
    assert "Traceback" not in run.stderr
