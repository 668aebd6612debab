# Resources of a job on each backend (local, Docker, Slurm, AWS Batch) and how a training job
# is launched: the run's `parallel` block (refrag.train.launch) read by gpu_resources and by
# the one launcher every training rule uses (inline, torchrun on one node, N nodes).
import json
import os
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

from refrag.train.launch import launch_command, run_parallel


def whole_machine(wildcards):
    """Every core of this run (--cores); 1 where none are given (--report, --rulegraph)."""
    try:
        return workflow.cores
    except WorkflowError:
        return 1


def train_threads(wildcards):
    """Threads of a training job: 8 on GPUs (collation workers, torchrun); on CPU the cores
    shared by the runs' k values, which train side by side (two one-thread jobs do more work on
    two cores than one two-thread job)."""
    if run_gpus(wildcards):
        return 8
    return max(1, whole_machine(wildcards) // len(run_keys()))


def run_parallel_settings(wildcards):
    """The job's run's parallel settings (refrag.train.launch.Parallel)."""
    return run_parallel(config, find_run(wildcards))


def run_gpus(wildcards):
    """GPUs per node of the job's run."""
    return run_parallel_settings(wildcards).gpus_per_node


def run_nodes(wildcards):
    return run_parallel_settings(wildcards).nodes


def run_submits_batch_job(wildcards):
    """True where the job's run trains on N > 1 nodes of AWS Batch: its rule submits a
    multi-node parallel job and waits for it."""
    parallel = run_parallel_settings(wildcards)
    return parallel.nodes > 1 and parallel.multinode == "aws-batch"


def parallel_param(wildcards):
    """The run's parallel settings as JSON (`refrag train --parallel`): a change reruns."""
    return json.dumps(run_parallel_settings(wildcards).as_dict())


# The Python of a job's shell command: the deployed one (`python` of the conda environment or
# container) under --software-deployment-method, else the one running Snakemake (.venv),
# whatever PATH says.
PYTHON = "python" if workflow.deployment_settings.deployment_method else sys.executable


def launcher(wildcards):
    """The run's launch command (refrag.train.launch.launch_command): inline on CPU or one
    GPU, torchrun --standalone on one node, one torchrun agent per node on N nodes."""
    return launch_command(PYTHON, run_parallel_settings(wildcards))


def gpu_resources(
    gpus, vcpu_per_gpu=8, mem_mb_per_gpu=61440, timeout_s=86400, nodes=1, submitter=None
):
    """`resources:` of a job on `gpus` GPUs per node on `nodes` nodes (ints or functions of
    the wildcards): `gpu` (the job's total) for local/docker/Slurm runs; memory (mem_mb, per
    node as Slurm's --mem), time (runtime, minutes) and CPUs per GPU for Slurm; the
    aws_batch_* request (per node) for AWS Batch (each ignored elsewhere). With `nodes`
    (multi-node) also `nodes`, `mpi` and `tasks` for Slurm: `sbatch --nodes=N --ntasks=N`,
    the jobstep runs the rule without wrapping it in `srun -n1`, and the rule's own srun
    starts one torchrun agent per node (`tasks_per_gpu=0`: else the plugin turns `tasks` of
    a GPU job into --ntasks-per-gpu). `submitter(wildcards)` true: on AWS Batch the job
    only submits a multi-node parallel job and waits (refrag.train.batch), on the CPU
    job definition with the profile's CPU defaults."""
    per_node = gpus if callable(gpus) else (lambda wildcards: gpus)
    node_count = nodes if callable(nodes) else (lambda wildcards: nodes)
    count = lambda wildcards: per_node(wildcards) * node_count(wildcards)
    node_mem = lambda wildcards: max(8192, mem_mb_per_gpu * per_node(wildcards))
    multi = {}
    if callable(nodes) or nodes > 1:
        multi = {
            "nodes": node_count,
            "mpi": lambda wildcards: "srun" if node_count(wildcards) > 1 else "",
            "tasks": node_count,
            "tasks_per_gpu": 0,
        }
    on_batch = lambda wildcards: 0 if submitter and submitter(wildcards) else 1
    return multi | {
        "gpu": count,
        "cpus_per_gpu": vcpu_per_gpu,  # Slurm (--gpus=N --cpus-per-gpu); CPU jobs use threads
        "mem_mb": node_mem,
        "runtime": timeout_s // 60,
        "aws_batch_gpu": lambda wildcards: per_node(wildcards) * on_batch(wildcards),
        "aws_batch_vcpu": lambda wildcards: max(
            2, vcpu_per_gpu * per_node(wildcards) * on_batch(wildcards)
        ),
        "aws_batch_mem_mb": lambda wildcards: (
            node_mem(wildcards) if on_batch(wildcards) else 8192
        ),
        "aws_batch_task_timeout": timeout_s,
        "aws_batch_job_definition": lambda wildcards: aws_job_definition(
            "gpu" if count(wildcards) * on_batch(wildcards) else "cpu"
        ),
    }


def aws_job_definition(kind):
    """The `kind` (cpu/gpu) job definition deploy/aws/setup_batch.py recorded."""
    path = Path(
        os.environ.get("REFRAG_AWS_DEPLOYMENT", "profiles/aws-batch/deployment.yaml")
    )
    if path.exists():
        return yaml.safe_load(path.read_text())["job_definitions"][kind]
    return f"refrag-{kind}"  # the set-up's default --name
