"""AWS Batch multi-node parallel jobs: submit one and wait for it.

The Batch executor plugin (aws-basic-batch) submits container jobs only, so a training job
on N > 1 nodes is submitted by its rule: :func:`submit` sends the command every node runs
(``nodeOverrides``: the node count, the command, vCPU/memory/GPUs per node) against the
``multinode`` job definition ``deploy/aws/setup_batch.py`` registered, and :func:`wait` polls
it to the end. Retries are the job definition's (``retryStrategy``: an attempt lost to the
infrastructure is retried by Batch; the job's own failure is not) and the workflow's
(Snakemake's ``retries`` resubmits the rule, hence a new job). Failures are one line
(:class:`BatchJobError`): the job's status reason, its attempts and each node's exit code. A
job the API cannot describe (an error, or unknown) for ``unknown_limit_s`` is a failure, not
a wait without end. Interrupted (Snakemake cancels the rule), the job is terminated.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import yaml
from botocore.exceptions import BotoCoreError, ClientError


class BatchJobError(RuntimeError):
    """A multi-node job that failed, or that the API lost track of (one line)."""


@dataclass(frozen=True)
class MultinodeJob:
    """What one multi-node parallel job asks for (per node, as Batch counts it)."""

    name: str
    job_queue: str
    job_definition: str
    nodes: int
    gpus_per_node: int
    vcpu_per_node: int
    memory_mib_per_node: int
    timeout_s: int = 86400
    workdir: str = "."
    environment: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=lambda: {"project": "refrag-workflow"})

    def submission(self, command: str) -> dict[str, Any]:
        """``submit_job`` arguments: every node (``0:``) runs ``command`` in ``workdir``."""
        if self.nodes < 2:
            raise ValueError(f"a multi-node parallel job needs 2 or more nodes, not {self.nodes}")
        requirements = [
            {"type": "VCPU", "value": str(self.vcpu_per_node)},
            {"type": "MEMORY", "value": str(self.memory_mib_per_node)},
        ]
        if self.gpus_per_node:
            requirements.append({"type": "GPU", "value": str(self.gpus_per_node)})
        overrides = {
            "command": ["bash", "-c", f"cd {shlex.quote(self.workdir)} && {command}"],
            "environment": [{"name": k, "value": v} for k, v in sorted(self.environment.items())],
            "resourceRequirements": requirements,
        }
        return {
            "jobName": self.name,
            "jobQueue": self.job_queue,
            "jobDefinition": self.job_definition,
            "nodeOverrides": {
                "numNodes": self.nodes,
                "nodePropertyOverrides": [{"targetNodes": "0:", "containerOverrides": overrides}],
            },
            "timeout": {"attemptDurationSeconds": self.timeout_s},
            "propagateTags": True,
            "tags": self.tags,
        }


def submit(client: Any, job: MultinodeJob, command: str) -> str:
    """Submit ``job`` running ``command`` on every node; its job id."""
    return client.submit_job(**job.submission(command))["jobId"]


def wait(
    client: Any,
    job_id: str,
    *,
    poll_s: float = 30.0,
    unknown_limit_s: float = 900.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Poll ``job_id`` until it ends: its description when SUCCEEDED, else
    :class:`BatchJobError`; status changes go to ``report``."""
    last_seen, status = clock(), None
    while True:
        try:
            found = client.describe_jobs(jobs=[job_id])["jobs"]
            problem = None if found else "unknown to AWS Batch"
        except (ClientError, BotoCoreError) as err:
            found, problem = [], f"not described ({type(err).__name__}: {err})"
        if problem:
            if clock() - last_seen > unknown_limit_s:
                raise BatchJobError(
                    f"multi-node job {job_id} {problem} for over {unknown_limit_s:g} s"
                )
        else:
            last_seen, described = clock(), found[0]
            if described["status"] != status:
                status = described["status"]
                report(f"multi-node job {described.get('jobName', '')} {job_id}: {status}")
            if status == "SUCCEEDED":
                return described
            if status == "FAILED":
                raise BatchJobError(failure_line(described))
        sleep(poll_s)


def failure_line(job: dict[str, Any]) -> str:
    """One line on a FAILED job: its name, id, node count, attempts, reason and exit code."""
    attempts = job.get("attempts") or []
    code = (attempts[-1].get("container") or {}).get("exitCode") if attempts else None
    nodes = (job.get("nodeProperties") or {}).get("numNodes")
    return (
        f"multi-node job {job.get('jobName', '')} {job['jobId']}"
        f"{f' ({nodes} nodes)' if nodes else ''} failed after {max(1, len(attempts))} "
        f"attempt(s): {job.get('statusReason') or 'no reason given'}"
        f"{f'; exit code {code}' if code is not None else ''}"
    )


def run(client: Any, job: MultinodeJob, command: str, **wait_options: Any) -> dict[str, Any]:
    """Submit and wait; the job is terminated if the wait is interrupted or fails to track it."""
    job_id = submit(client, job, command)
    print(f"submitted multi-node job {job.name} {job_id} ({job.nodes} nodes)", flush=True)
    try:
        return wait(client, job_id, **wait_options)
    except BatchJobError as err:
        if "failed after" not in str(err):
            terminate(client, job_id, "refrag: lost track of the job")
        raise
    except BaseException:
        terminate(client, job_id, "refrag: the rule was interrupted")
        raise


def terminate(client: Any, job_id: str, reason: str) -> None:
    try:
        client.terminate_job(jobId=job_id, reason=reason)
    except (ClientError, BotoCoreError) as err:
        print(f"could not terminate multi-node job {job_id}: {err}", flush=True)


DEPLOYMENT = "profiles/aws-batch/deployment.yaml"


def deployment_settings(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The settings deploy/aws/setup_batch.py wrote (``REFRAG_AWS_DEPLOYMENT`` or
    profiles/aws-batch/deployment.yaml), ``{}`` where there are none."""
    path = Path(path or os.environ.get("REFRAG_AWS_DEPLOYMENT", DEPLOYMENT))
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``refrag batch-multinode`` options; unset ones come from the deployment file."""
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--vcpu-per-gpu", type=int, default=8)
    parser.add_argument("--mem-mb-per-gpu", type=int, default=61440)
    parser.add_argument("--timeout-s", type=int, default=86400)
    parser.add_argument("--region", help="default: the deployment's")
    parser.add_argument("--job-queue", help="default: the deployment's")
    parser.add_argument("--job-definition", help="default: the deployment's multinode one")
    parser.add_argument("--workdir", default=os.getcwd(), help="where each node runs (shared)")
    parser.add_argument("--name", default="refrag-train")
    parser.add_argument("--poll-s", type=float, default=30.0)
    parser.add_argument(
        "--unknown-limit-s",
        type=float,
        default=float(os.environ.get("REFRAG_AWS_UNKNOWN_LIMIT_S", 900)),
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- what every node runs")


def run_from_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Submit the multi-node job ``args`` describe and wait for it (``refrag batch-multinode``)."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise BatchJobError("batch-multinode: no command after --")
    deployment = deployment_settings()
    region = args.region or deployment.get("region")
    queue = args.job_queue or deployment.get("job_queue")
    definition = args.job_definition or deployment.get("job_definitions", {}).get("multinode")
    if not (region and queue and definition):
        raise BatchJobError(
            "batch-multinode: no region, job queue or multinode job definition (give them, or "
            "run deploy/aws/setup_batch.py, which records them in "
            f"{os.environ.get('REFRAG_AWS_DEPLOYMENT', DEPLOYMENT)})"
        )
    g = args.gpus_per_node
    job = MultinodeJob(
        name=args.name,
        job_queue=queue,
        job_definition=definition,
        nodes=args.nodes,
        gpus_per_node=g,
        vcpu_per_node=max(2, args.vcpu_per_gpu * g),
        memory_mib_per_node=max(8192, args.mem_mb_per_gpu * g),
        timeout_s=args.timeout_s,
        workdir=args.workdir,
        environment={k: v for k, v in os.environ.items() if k in FORWARDED},
    )
    # the first word is the node's agent line (one shell string), the rest its arguments
    line = " ".join([command[0], shlex.join(command[1:])])
    client = boto3.session.Session(region_name=region).client("batch")
    return run(client, job, line, poll_s=args.poll_s, unknown_limit_s=args.unknown_limit_s)


# what the rule's environment passes on to the nodes (plain settings, never credentials)
FORWARDED = ("OMP_NUM_THREADS", "NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "PYTHONHASHSEED")
