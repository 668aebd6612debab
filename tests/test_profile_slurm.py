"""profiles/slurm against a real Slurm (slurmctld, slurmd, munged from Debian's packages;
.ci/slurm.sh starts it, .ci/services.sh runs that in CI): partition `ci` is this host as one
node; partition `ci2` is two more slurmd on this host, where a training job spans two nodes.

One `snakemake --profile slurm --keep-going` runs the tiny workflow (tiny random-weight models,
a small local corpus) to its report through `sbatch` (rules grouped into a few Slurm jobs to
keep it short: GROUPS; run one by one, the same test took 17 min on a loaded 2-core machine,
all checks passing), its run on 1 GPU: the
cluster declares 2 GPUs as generic resources (no devices), so Slurm allocates the training jobs
a GPU (`--gpus=1`, from gpu_resources) while they train on the CPU. `hello_dist` runs torchrun
with 2 ranks inside its allocation, one log per rank. (Training itself under torchrun is not
run here: the align stage fails under DDP, refrag/training.py's alignment_losses reads
`model.encoder` of the DDP wrapper.)
In the same run a job is cancelled by Slurm (`scancel`) while it runs: it must be reported as
failed, with its log. The CI cluster has no accounting database, so job states come from
squeue (`--slurm-status-command squeue`; slurmctld keeps finished jobs for MinJobAge = 900 s).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from refrag.train.launch import Parallel, launch_command

from .conftest_profiles import copy_worktree, unavailable
from .test_multinode import check_two_node_run, free_port, train_args
from .test_workflow import tiny_workspace

PROBE = """include: "Snakefile"


rule gpu_probe:
    output:
        "results/probe/slurm.txt",
    log:
        "logs/probe/slurm.log",
    resources:
        gpu=1,
    shell:
        "env | grep -E '^SLURM_(JOB_PARTITION|JOB_ID)=' | sort > {output} 2> {log}"


rule cancelled_probe:
    output:
        "results/probe/cancelled.txt",
    log:
        "logs/probe/cancelled.log",
    shell:
        "echo running as Slurm job $SLURM_JOB_ID > {log}; sleep 600; touch {output}"
"""
TRAIN_RULES = ("train",)  # one rule, a job per stage (refrag.train.stages)
# Rules grouped into one sbatch job per group (and connected part): fewer Slurm jobs, so the
# test stays short on 2 cores. The workflow's localrules (perplexity_table, rulegraph,
# eval_report) run on the submitting host, as on a real cluster.
GROUPS = {
    "data": ("fetch_model", "prepare_corpus", "tokenize", "align_pairs", "heldout_baselines"),
    "train": TRAIN_RULES,
    "eval": ("eval_baselines", "eval_refrag", "bench_ttft"),
}


def slurm_is_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "--noheader"], capture_output=True, text=True, timeout=10)
    return out.returncode == 0 and " up " in out.stdout


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory, decoder_dir, encoder_dir):
    if not slurm_is_up():
        unavailable("no Slurm here (CI starts one: bash .ci/services.sh, or bash .ci/slurm.sh)")
    runs = [{"decoder": "tiny-decoder", "encoder": "tiny-encoder", "k": [4], "gpus": 1}]
    ws = tiny_workspace(
        tmp_path_factory.mktemp("slurm"), decoder_dir, encoder_dir, runs=runs, windows=32, steps=2
    )
    (ws / "slurm_probe.smk").write_text(PROBE)
    # The CI node has 2 CPUs and ~23 GB: fit the GPU training jobs onto it.
    fit = [f"{rule}:{r}" for rule in TRAIN_RULES for r in ("cpus_per_gpu=1", "mem_mb=6000")]
    fit += [f"{rule}:mem_mb=3000" for rule in GROUPS["data"] + GROUPS["eval"]]
    env = os.environ | {"REFRAG_SLURM_PARTITION": "ci"}
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            "slurm_probe.smk",
            "--profile",
            "profiles/slurm",
            "--slurm-status-command",
            "squeue",
            "--slurm-init-seconds-before-status-checks",
            "5",
            "--set-resources",
            *fit,
            "--groups",
            *[f"{rule}={group}" for group, rules in GROUPS.items() for rule in rules],
            # a group job asks for what its jobs running side by side need: keep it on the node
            "--cores",
            "2",
            "--resources",
            "mem_mb=16000",
            "--keep-going",
            "eval_report",
            "hello_dist",
            "gpu_probe",
            "cancelled_probe",
        ],
        cwd=ws,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    cancelled = None
    log = ws / "logs/probe/cancelled.log"
    try:
        for _ in range(600):  # cancel the sleeping job as soon as it runs
            if proc.poll() is not None:
                break
            if log.exists() and (found := re.search(r"Slurm job (\d+)", log.read_text())):
                cancelled = found[1]
                subprocess.run(["scancel", cancelled], check=True)
                break
            time.sleep(1)
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {
        "ws": ws,
        "returncode": proc.returncode,
        "output": output,
        "cancelled": cancelled,
        "seconds": time.monotonic() - started,
    }


def submissions(output: str) -> dict[str, list[str]]:
    """Slurm job ids by rule_<rule> or group_<group> (the start of their log folder's name)."""
    found: dict[str, list[str]] = {}
    for job, where in re.findall(r"SLURM jobid (\d+) \(log: \S+/logs/slurm/(\w+)/", output):
        if where.startswith("group_"):  # group_<group>_<its rules>
            where = "_".join(where.split("_")[:2])
        found.setdefault(where, []).append(job)
    return found


def slurm_jobs(*fields: str) -> dict[str, list[str]]:
    """squeue's fields of every job slurmctld remembers, by job id."""
    out = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--Format=" + ",".join(f"{f}:40" for f in fields)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}


@pytest.mark.slow
def test_the_tiny_workflow_runs_to_its_report_through_sbatch(slurm_run):
    ws, output = slurm_run["ws"], slurm_run["output"]
    assert (ws / "results/report.html").exists(), output[-6000:]
    assert (ws / "results/eval/perplexity.csv").exists()
    jobs = submissions(output)
    assert {"group_data", "group_train", "group_eval", "rule_hello_dist"} <= set(jobs)
    states = slurm_jobs("JobID", "State", "Partition")
    for job in (j for ids in jobs.values() for j in ids if j != slurm_run["cancelled"]):
        assert states[job] == ["COMPLETED", "ci"], (job, states[job])


@pytest.mark.slow
def test_gpu_rules_get_slurm_gpus_in_the_profiles_partition(slurm_run):
    jobs = submissions(slurm_run["output"])
    tres = slurm_jobs("JobID", "tres-per-job")
    for job in jobs["rule_gpu_probe"] + jobs["group_train"]:  # resources: gpu=1, gpu_resources(1)
        assert tres[job] == ["gres:gpu:1"]
    probe = (slurm_run["ws"] / "results/probe/slurm.txt").read_text().split()
    assert "SLURM_JOB_PARTITION=ci" in probe  # REFRAG_SLURM_PARTITION through the profile
    assert (slurm_run["ws"] / "results/checkpoints/tiny/tiny-decoder/tiny-encoder/k4/cpt").is_dir()


@pytest.mark.slow
def test_torchrun_runs_inside_the_allocation_with_one_log_per_rank(slurm_run):
    ranks = sorted((slurm_run["ws"] / "logs/hello_dist/ranks").glob("run-*.log"))
    assert [p.name for p in ranks] == ["run-0.log", "run-1.log"]
    world = (slurm_run["ws"] / "results/hello_dist/world.json").read_text()
    assert '"world_size": 2' in world


@pytest.mark.slow
def test_a_job_cancelled_by_slurm_is_reported_failed_with_its_log(slurm_run):
    ws, output, job = slurm_run["ws"], slurm_run["output"], slurm_run["cancelled"]
    assert job is not None, output[-4000:]
    assert slurm_run["returncode"] != 0
    assert f"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED'" in output
    assert "Error in rule cancelled_probe" in output
    slurm_log = ws / f"logs/slurm/rule_cancelled_probe/{job}.log"
    assert str(slurm_log) in output and slurm_log.exists()
    assert (ws / "logs/probe/cancelled.log").read_text().startswith(f"running as Slurm job {job}")
    assert not (ws / "results/probe/cancelled.txt").exists()


# --- multi-node: the sbatch call of a 2 nodes × 8 GPUs training job (no Slurm needed) ---
FAKE_SBATCH = """#!/bin/sh
# records the call and refuses it: the plugin then reports the call and stops
printf '%s\\n' "$*" > "$SBATCH_RECORD"
echo "recorded by the test" >&2
exit 1
"""

# no accounting: the plugin's account guess finds none, with or without Slurm installed here
FAKE_SACCT = """#!/bin/sh
exit 0
"""


@pytest.mark.slow
def test_a_two_node_training_job_asks_sbatch_for_2_nodes_16_gpus_and_one_agent_per_node(
    tmp_path,
):
    """The real Slurm plugin builds the call from the train rule's resources (the paper's
    models, `parallel: {nodes: 2, gpus_per_node: 8}`); a fake `sbatch` records it. The align
    stage's inputs are stand-ins (the models' shapes only), so only that job is submitted."""
    ws = copy_worktree(tmp_path / "work")
    (ws / "two_nodes.yaml").write_text("parallel: {nodes: 2, gpus_per_node: 8}\n")
    for name, repo in (
        ("llama-2-7b", "meta-llama/Llama-2-7b-hf"),
        ("roberta-large", "FacebookAI/roberta-large"),
    ):
        (ws / "resources/models" / name).mkdir(parents=True)
        shutil.copy(ws / "config/shapes" / repo / "config.json", ws / "resources/models" / name)
    pairs = ws / "results/alignment/slimpajama-arxiv-book/llama-2-7b/roberta-large/train.parquet"
    pairs.parent.mkdir(parents=True)
    pairs.write_bytes(b"")
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    record = tmp_path / "sbatch.txt"
    env = os.environ | {
        "PATH": f"{fake}:{os.environ['PATH']}",
        "SBATCH_RECORD": str(record),
        "REFRAG_SLURM_PARTITION": "gpu",
    }
    target = "results/checkpoints/slimpajama-arxiv-book/llama-2-7b/roberta-large/k16/align"
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", target, "--profile", "profiles/slurm"]
        + ["--allowed-rules", "train", "--configfile", "config/paper.yaml", "two_nodes.yaml"],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert record.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    call = record.read_text().split(" --wrap=")[0].split()
    assert {"-p", "gpu", "--nodes=2", "--ntasks=2", "--gpus=16", "--cpus-per-gpu=8"} <= set(call)
    assert call[call.index("--mem") + 1] == str(8 * 61440)  # per node: 8 GPUs' worth
    assert call[call.index("-t") + 1] == "1440"
    assert not [flag for flag in call if flag.startswith("--ntasks-per-gpu")]  # the trap
    # the job's rule starts one torchrun agent per node with a c10d rendezvous on the first
    shell = result.stderr
    assert "srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 bash -c" in shell
    assert "--nnodes=$SLURM_NNODES --nproc-per-node=8 --rdzv-id=$SLURM_JOB_ID" in shell
    assert "--rdzv-backend=c10d --rdzv-endpoint=$head:29500" in shell


# --- multi-node on the CI cluster: partition ci2 is two slurmd (node1, node2) on this host ---
def two_node_partition_is_up() -> bool:
    if not slurm_is_up():
        return False
    out = subprocess.run(
        ["sinfo", "--noheader", "-p", "ci2", "--Node", "--format=%N %T"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return out.stdout.split() == ["node1", "idle", "node2", "idle"]


@pytest.mark.slow
def test_a_training_job_spans_two_slurm_nodes(tiny_checkpoint, shards, tmp_path):
    """The launch line of a 2-node job (launch_command: srun, one torchrun agent per node,
    c10d rendezvous at the first node), submitted with the real `sbatch --nodes=2` to the CI
    cluster's two-node partition: the agents run on node1 and node2 and train the tiny model
    with world size 2 (gloo on the CPU; each node's GRES gpu has no device)."""
    if not two_node_partition_is_up():
        unavailable("no two-node Slurm partition ci2 here (bash .ci/slurm.sh starts one)")
    command = launch_command(sys.executable, Parallel(nodes=2, gpus_per_node=1), free_port())
    out, ranks = tmp_path / "cpt", tmp_path / "ranks"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\nsrun --ntasks-per-node=1 printenv SLURMD_NODENAME\n"
        f"{command} {train_args(tiny_checkpoint, shards, out, ranks)}\n"
    )
    job_out = tmp_path / "slurm.out"
    result = subprocess.run(
        ["sbatch", "--parsable", "--wait", "-p", "ci2", "--nodes=2", "--ntasks=2"]
        + ["--gpus-per-node=1", "--mem=3000", "-t", "10", "-o", str(job_out), str(script)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = job_out.read_text() if job_out.exists() else ""
    check_two_node_run(
        subprocess.CompletedProcess("sbatch", result.returncode, log, ""), out, ranks
    )
    assert sorted(log.split()[:2]) == ["node1", "node2"], log[:500]
    job = subprocess.run(
        ["scontrol", "show", "job", "-o", result.stdout.strip().split(";")[0]],
        capture_output=True,
        text=True,
    ).stdout
    assert " NodeList=node[1-2] " in job and " NumNodes=2 " in job, job
