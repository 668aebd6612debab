# Resources of a job on each backend (local, Docker, Slurm, AWS Batch) and how a training job
# is launched (inline, or torchrun with one process per GPU).
import os
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError


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


def run_gpus(wildcards):
    return find_run(wildcards).get("gpus", 0)


# The Python of a job's shell command: the deployed one (`python` of the conda environment or
# container) under --software-deployment-method, else the one running Snakemake (.venv),
# whatever PATH says.
PYTHON = "python" if workflow.deployment_settings.deployment_method else sys.executable


def launcher(wildcards, resources):
    """torchrun with one process per GPU; on CPU (or one GPU) the script runs inline."""
    if resources.gpu > 1:
        return f"{PYTHON} -m torch.distributed.run --standalone --nproc_per_node={resources.gpu}"
    return PYTHON


def gpu_resources(gpus, vcpu_per_gpu=8, mem_mb_per_gpu=61440, timeout_s=86400):
    """`resources:` of a job on `gpus` GPUs (an int or a function of the wildcards): `gpu`
    for local/docker/Slurm runs, with memory (mem_mb), time (runtime, minutes) and CPUs per
    GPU for Slurm, the aws_batch_* request for AWS Batch (each ignored elsewhere)."""
    count = gpus if callable(gpus) else (lambda wildcards: gpus)
    return {
        "gpu": count,
        "cpus_per_gpu": vcpu_per_gpu,  # Slurm (--gpus=N --cpus-per-gpu); CPU jobs use threads
        "mem_mb": lambda wildcards: max(8192, mem_mb_per_gpu * count(wildcards)),
        "runtime": timeout_s // 60,
        "aws_batch_gpu": count,
        "aws_batch_vcpu": lambda wildcards: max(2, vcpu_per_gpu * count(wildcards)),
        "aws_batch_mem_mb": lambda wildcards: max(
            8192, mem_mb_per_gpu * count(wildcards)
        ),
        "aws_batch_task_timeout": timeout_s,
        "aws_batch_job_definition": lambda wildcards: aws_job_definition(
            "gpu" if count(wildcards) else "cpu"
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
