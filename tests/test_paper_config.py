"""config/paper.yaml (LLaMA-2-7B + RoBERTa-large, 8 nodes × 8 GPUs, FSDP) plans offline under
the Slurm profile and passes the memory check; with `strategy: ddp` it is refused before any
job. The models' shapes come from config/shapes (no network, no weights); its corpus,
SlimPajama streamed from the hub, plans as corpus.shards part jobs (no network either)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from refrag.preflight import run_memory_errors
from refrag.train.launch import run_parallel
from refrag.train.memory import KNOWN_CONFIGS, Shapes

from .conftest import TEXT
from .conftest_profiles import copy_worktree
from .test_streaming import slimpajama_shard

REPO = Path(__file__).resolve().parent.parent
PAPER = yaml.safe_load((REPO / "config/paper.yaml").read_text())


def dry_run(ws: Path, *configfiles: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "eval_report", "-n", "-p"]
        + ["--profile", "profiles/slurm", "--configfile", "config/paper.yaml", *configfiles],
        cwd=ws,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = copy_worktree(tmp_path_factory.mktemp("paper") / "work")
    (ws / "ddp.yaml").write_text("parallel: {strategy: ddp}\n")
    shards = ws / "slimpajama" / "train"
    for i in range(3):  # a stand-in for SlimPajama's train/ folder: 3 shards
        slimpajama_shard(
            shards / f"chunk{i}" / "example_train_0.jsonl.zst",
            [{"text": TEXT * 3, "meta": {"redpajama_set_name": "RedPajamaBook"}}] * 4,
        )
    (ws / "streamed.yaml").write_text(
        yaml.safe_dump(
            {"corpus": {"source": str(shards), "streamed": True, "subsets": ["RedPajamaBook"]}}
        )
    )
    return ws


def test_the_shipped_shapes_are_the_published_models():
    decoder = Shapes.of(KNOWN_CONFIGS["meta-llama/Llama-2-7b-hf"], causal=True)
    encoder = Shapes.of(KNOWN_CONFIGS["roberta-large"], causal=False)
    assert (decoder.params, decoder.layers, decoder.hidden, decoder.vocab) == (
        6_738_415_616,
        32,
        4096,
        32000,
    )
    assert (encoder.layers, encoder.hidden, encoder.vocab) == (24, 1024, 50265)
    assert 354_000_000 < encoder.params < 356_000_000


def test_the_paper_config_fits_80_gib_cards_with_fsdp_and_not_with_ddp(tmp_path):
    run = PAPER["runs"][0]
    parallel = run_parallel(PAPER, run)
    assert (parallel.nodes, parallel.gpus_per_node, parallel.strategy) == (8, 8, "fsdp")
    assert run_memory_errors(PAPER, run, parallel, tmp_path) == []
    ddp = PAPER | {"parallel": PAPER["parallel"] | {"strategy": "ddp"}}
    errors = run_memory_errors(ddp, run, run_parallel(ddp, run), tmp_path)
    assert errors and all("with ddp on 80 GiB cards; set strategy: fsdp" in e for e in errors)


@pytest.mark.slow
def test_the_paper_config_plans_under_the_slurm_profile_offline(workspace):
    result = dry_run(workspace)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    # 3 k × (align, reconstruct, cpt), and sft, mixed, policy at k = 16
    assert re.search(r"^train\s+12$", out, re.MULTILINE), out[-3000:]
    assert "srun --nodes=8 --ntasks-per-node=1 --gpus-per-node=8 bash -c" in out
    assert "--nnodes=$SLURM_NNODES --nproc-per-node=8" in out
    assert not (workspace / "resources/models").exists()  # nothing fetched for the plan
    # SlimPajama streamed from the hub in corpus.shards = 256 parts, planned without network
    for rule, count in (("split_part", 256), ("tokenize_part", 256), ("gather_train_shards", 1)):
        assert re.search(rf"^{rule}\s+{count}$", out, re.MULTILINE), (rule, out[-3000:])
    assert not re.search(r"^fetch_corpus\s", out, re.MULTILINE)


@pytest.mark.slow
def test_the_paper_config_with_ddp_is_refused_before_any_job(workspace):
    result = dry_run(workspace, "ddp.yaml")
    assert result.returncode != 0
    assert "config errors, nothing was run" in result.stderr
    assert "k16/cpt needs ~136 GiB per GPU with ddp on 80 GiB cards; set strategy: fsdp" in (
        result.stderr
    )
    assert "Building DAG" not in result.stdout + result.stderr


@pytest.mark.slow
def test_the_paper_config_with_its_corpus_streamed_plans_one_job_per_shard(workspace):
    result = dry_run(workspace, "streamed.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    for rule, count in (("split_part", 3), ("tokenize_part", 3), ("gather_train_shards", 1)):
        assert re.search(rf"^{rule}\s+{count}$", out, re.MULTILINE), (rule, out[-3000:])
    assert re.search(r"^tokenize\s+2$", out, re.MULTILINE)  # validation and test only
