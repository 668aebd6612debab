"""Start-up checks of `snakemake --profile aws-batch`, run by the profile before any job is planned.

profiles/aws-batch/config.yaml calls `run()` while Snakemake reads the profile, so each problem
ends the run in one line (exit 1) instead of a traceback per S3 call:
- deployment.yaml missing or incomplete (deploy/aws/setup_batch.py writes it);
- AWS credentials missing, expired or rejected (one STS GetCallerIdentity call);
- the image built from another commit than the work tree (jobs run the workflow baked into
  the image, not this checkout), or the work tree changed since;
- the job queue (ENABLED, VALID) and every job definition (ACTIVE) that jobs will be submitted
  to, so a deployment without them stops here, not after a local job has run.
Paths are the workflow's (``root``, found by the profile from its own folder), never the
current folder's.
It also bounds how long a job may stay unknown to the executor's status check (which reports
"still running" on any API error or a job it cannot find): after `REFRAG_AWS_UNKNOWN_LIMIT_S`
seconds (default 900) with no answer, the job is failed with a line saying so.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import boto3
import yaml
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from snakemake_executor_plugin_aws_basic_batch import Executor

ROOT = Path(__file__).resolve().parents[2]  # the workflow's folder (deploy/aws/..)
DEPLOYMENT = Path("profiles/aws-batch/deployment.yaml")  # relative to the workflow's folder
# What the image holds of the work tree (the allow-list in .dockerignore) and jobs run.
IMAGE_PATHS = (
    "Snakefile",
    "workflow",
    "refrag",
    "config",
    "profiles/default",
    "benchmarks",
    "pyproject.toml",
    "requirements.lock",
)
UNKNOWN_LIMIT_S = 900.0


def fail(message: str) -> None:
    raise SystemExit(f"aws-batch: {message}")


def load_deployment(path: Path | None = None, root: Path = ROOT) -> dict:
    """The settings deploy/aws/setup_batch.py wrote (REFRAG_AWS_DEPLOYMENT overrides the path)."""
    path = Path(path or os.environ.get("REFRAG_AWS_DEPLOYMENT") or root / DEPLOYMENT)
    if not path.exists():
        fail(f"{path} not found: run deploy/aws/setup_batch.py first (deploy/aws/README.md)")
    deployment = yaml.safe_load(path.read_text()) or {}
    missing = {"region", "bucket", "prefix", "job_queue", "job_definitions"} - set(deployment)
    if missing:
        fail(f"{path} lacks {', '.join(sorted(missing))}: rerun deploy/aws/setup_batch.py")
    return deployment


def check_credentials(sts) -> str:
    """The caller's ARN; one line and exit 1 when credentials are missing, expired or refused."""
    try:
        return sts.get_caller_identity()["Arn"]
    except NoCredentialsError:
        fail(
            "no AWS credentials found (set AWS_PROFILE, run `aws sso login`, or export "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY); nothing was submitted"
        )
    except ClientError as err:
        error = err.response.get("Error", {})
        fail(
            f"AWS refused the credentials ({error.get('Code')}: {error.get('Message')}); "
            "renew them (e.g. `aws sso login`); nothing was submitted"
        )
    except BotoCoreError as err:
        fail(f"cannot check the AWS credentials: {err}; nothing was submitted")


def work_tree_state(repo: Path = Path(".")) -> tuple[str | None, list[str]]:
    """(HEAD commit, changed tracked files the image holds); (None, []) outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *IMAGE_PATHS],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None, []
    return head, [line[3:] for line in changed]


def check_image_commit(deployment: dict, repo: Path = Path(".")) -> None:
    """Refuse when the jobs' image was built from another commit than this work tree."""
    image_commit = deployment.get("image_commit")
    head, changed = work_tree_state(repo)
    if head is None or os.environ.get("REFRAG_AWS_ALLOW_IMAGE_MISMATCH") == "1":
        return
    fix = (
        "rebuild and push the image, rerun deploy/aws/setup_batch.py "
        "(or set REFRAG_AWS_ALLOW_IMAGE_MISMATCH=1)"
    )
    if not image_commit:
        fail(f"deployment.yaml names no image_commit, so the image cannot be checked: {fix}")
    if head != image_commit:
        fail(
            f"the image {deployment.get('image')} holds commit {image_commit[:12]}, "
            f"the work tree is at {head[:12]}: {fix}"
        )
    if changed:
        fail(
            f"uncommitted changes the image does not hold ({', '.join(changed[:5])}): "
            f"commit them and {fix}"
        )


def check_batch_resources(batch, deployment: dict) -> None:
    """Refuse unless the job queue is ENABLED and VALID and every job definition of the
    deployment has an ACTIVE revision: the ones jobs will be submitted to."""
    fix = "rerun deploy/aws/setup_batch.py (deploy/aws/README.md); nothing was submitted"
    region = deployment.get("region")
    try:
        queue = deployment["job_queue"]
        found = batch.describe_job_queues(jobQueues=[queue]).get("jobQueues", [])
        if not found:
            fail(f"job queue {queue} does not exist in {region}: {fix}")
        state, status = found[0].get("state"), found[0].get("status")
        if state != "ENABLED" or status != "VALID":
            fail(f"job queue {queue} is {state}/{status}, not ENABLED/VALID: {fix}")
        for role, name in sorted(deployment["job_definitions"].items()):
            name = str(name).split(":")[0].rsplit("/", 1)[-1]  # name, name:rev or an ARN
            active = batch.describe_job_definitions(jobDefinitionName=name, status="ACTIVE")
            if not active.get("jobDefinitions"):
                fail(f"job definition {name} ({role}) has no ACTIVE revision in {region}: {fix}")
    except ClientError as err:
        error = err.response.get("Error", {})
        fail(
            f"cannot check the Batch queue and job definitions ({error.get('Code')}: "
            f"{error.get('Message')}); nothing was submitted"
        )
    except BotoCoreError as err:
        fail(f"cannot check the Batch queue and job definitions: {err}; nothing was submitted")


def bound_unknown_status(executor_cls, limit_s: float) -> None:
    """Make the aws-basic-batch executor fail a job it could not see for `limit_s` seconds,
    and name the job's CloudWatch log stream when it fails."""
    original = executor_cls._get_job_status
    if getattr(original, "refrag_bounded", False):
        return

    def status(self, job):
        code, msg = original(self, job)
        if code is None and msg is not None:  # an API error or no such job: not an answer
            since = job.aux.setdefault("refrag_unknown_since", time.monotonic())
            if time.monotonic() - since > limit_s:
                return 1, (
                    f"no status for {limit_s:.0f} s (last: {msg}); if it still runs: "
                    f"aws batch terminate-job --job-id {job.external_jobid} --reason stale"
                )
            return None, msg
        job.aux.pop("refrag_unknown_since", None)
        if code:
            msg = f"{msg}{log_stream(self, job.external_jobid)}"
        return code, msg

    status.refrag_bounded = True
    executor_cls._get_job_status = status


def log_stream(executor, job_id: str) -> str:
    """Where the failed job's output is: its attempts and CloudWatch log stream."""
    try:
        job = executor.batch_client.describe_jobs(jobs=[job_id])["jobs"][0]
    except Exception:  # noqa: BLE001 - only decorates the failure message
        return ""
    stream = job.get("container", {}).get("logStreamName")
    where = f"; CloudWatch log group /aws/batch/job, stream {stream}" if stream else ""
    return f"; attempts: {len(job.get('attempts', [])) or 1}{where}"


def run(root: str | os.PathLike = ROOT) -> dict:
    """All checks, with the workflow's folder ``root`` (not the current one); the deployment
    settings for the profile."""
    root = Path(root)
    deployment = load_deployment(root=root)
    config = Config(connect_timeout=10, read_timeout=20, retries={"max_attempts": 2})
    session = boto3.session.Session(region_name=deployment["region"])
    check_credentials(session.client("sts", config=config))
    check_image_commit(deployment, repo=root)
    check_batch_resources(session.client("batch", config=config), deployment)
    bound_unknown_status(
        Executor, float(os.environ.get("REFRAG_AWS_UNKNOWN_LIMIT_S", UNKNOWN_LIMIT_S))
    )
    return deployment
