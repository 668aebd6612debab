#!/usr/bin/env python3
"""One-time AWS set-up for `snakemake --profile aws-batch`: bucket safeguards, job role, job
definitions, job queue; writes profiles/aws-batch/deployment.yaml, which the profile reads.

    python deploy/aws/setup_batch.py --region eu-west-1 --bucket my-refrag-bucket \\
        --image 123456789012.dkr.ecr.eu-west-1.amazonaws.com/refrag-workflow:abc1234 \\
        --compute-environment my-gpu-ce            # or: --subnets … --security-groups …

Idempotent: rerun it after pushing a new image (new job-definition revisions are registered).
Credentials and endpoints come from boto3's usual chain (AWS_PROFILE, AWS_ENDPOINT_URL, …);
nothing secret is written to the job definitions or to deployment.yaml. See deploy/aws/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import boto3
import yaml
from botocore.exceptions import ClientError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEPLOYMENT = REPO / "profiles" / "aws-batch" / "deployment.yaml"
SENTINEL_KEY = ".refrag-bucket-sentinel"  # outside the workflow prefix: see ensure_bucket
LIFECYCLE_RULE_ID = "refrag-expire-old-versions"

# Shapes of the two job definitions. Each submitted job overrides vCPU, memory and GPU count
# (profiles/aws-batch: the per-rule aws_batch_* resources), and the timeout.
CPU_DEFAULTS = {"vcpu": 2, "memory_mib": 8192, "timeout_s": 4 * 3600, "shm_mib": 2048}
GPU_DEFAULTS = {"vcpu": 8, "memory_mib": 61440, "gpus": 1, "timeout_s": 24 * 3600, "shm_mib": 65536}
JOB_ENVIRONMENT = {  # plain settings only: never credentials (HF_TOKEN: --hf-token-secret-arn)
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HOME": "/tmp/huggingface",
}
GPU_ENVIRONMENT = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
# Batch retries an attempt lost to the infrastructure (a Spot reclaim or a dead host, an image
# that failed to pull, a container that could not start) and gives up at once on anything else,
# i.e. the job's own non-zero exit: Snakemake's `retries` (the profile) decides those. Batch
# matches the conditions in order; with none matching it would retry, hence the final EXIT.
RETRY_ATTEMPTS = 3
RETRY_ON = [
    {"onStatusReason": "Host EC2*", "action": "RETRY"},
    {"onReason": "CannotPullContainerError*", "action": "RETRY"},
    {"onReason": "CannotStartContainerError*", "action": "RETRY"},
    {"onReason": "CannotInspectContainerError*", "action": "RETRY"},
    {"onReason": "CannotCreateContainerError*", "action": "RETRY"},
    {"onReason": "DockerTimeoutError*", "action": "RETRY"},
    {"onReason": "ResourceInitializationError*", "action": "RETRY"},
    {"onReason": "*", "action": "EXIT"},
]


def job_definitions(
    name: str,
    image: str,
    job_role_arn: str | None,
    execution_role_arn: str | None = None,
    hf_token_secret_arn: str | None = None,
    gpu_shm_mib: int = GPU_DEFAULTS["shm_mib"],
    shared_efs: str | None = None,
    shared_path: str = "/shared",
) -> dict[str, dict]:
    """`register_job_definition` arguments of `{name}-cpu`, `{name}-gpu` and
    `{name}-multinode` (a multi-node parallel job: every node the GPU container; a training
    rule on N > 1 nodes submits it with its node count, refrag.train.batch), keyed
    cpu/gpu/multinode. With `shared_efs`, every container mounts that EFS file system at
    `shared_path` (multi-node training reads and writes its files there)."""

    def one(kind: str, shape: dict, environment: dict, shm_mib: int, ulimits: list) -> dict:
        requirements = [
            {"type": "VCPU", "value": str(shape["vcpu"])},
            {"type": "MEMORY", "value": str(shape["memory_mib"])},
        ]
        if shape.get("gpus"):
            requirements.append({"type": "GPU", "value": str(shape["gpus"])})
        container = {
            "image": image,
            "command": ["python", "-m", "snakemake", "--version"],  # every job overrides it
            "resourceRequirements": requirements,
            "environment": [{"name": k, "value": v} for k, v in sorted(environment.items())],
            "linuxParameters": {"sharedMemorySize": shm_mib, "initProcessEnabled": True},
            "ulimits": ulimits,
            "readonlyRootFilesystem": False,
            "privileged": False,
        }
        if job_role_arn:
            container["jobRoleArn"] = job_role_arn
        if hf_token_secret_arn:
            container["secrets"] = [{"name": "HF_TOKEN", "valueFrom": hf_token_secret_arn}]
        if execution_role_arn:
            container["executionRoleArn"] = execution_role_arn
        if shared_efs:
            container["volumes"] = [
                {"name": "shared", "efsVolumeConfiguration": {"fileSystemId": shared_efs}}
            ]
            container["mountPoints"] = [
                {"sourceVolume": "shared", "containerPath": shared_path, "readOnly": False}
            ]
        return {
            "jobDefinitionName": f"{name}-{kind}",
            "type": "container",
            "platformCapabilities": ["EC2"],
            "containerProperties": container,
            "timeout": {"attemptDurationSeconds": shape["timeout_s"]},
            "retryStrategy": {"attempts": RETRY_ATTEMPTS, "evaluateOnExit": RETRY_ON},
            "propagateTags": True,
            "tags": {"project": "refrag-workflow"},
        }

    nofile = {"name": "nofile", "softLimit": 65536, "hardLimit": 65536}
    memlock = {"name": "memlock", "softLimit": -1, "hardLimit": -1}  # NCCL / EFA pinned memory
    gpu_environment = JOB_ENVIRONMENT | GPU_ENVIRONMENT
    gpu = one("gpu", GPU_DEFAULTS, gpu_environment, gpu_shm_mib, [nofile, memlock])
    multinode = one("multinode", GPU_DEFAULTS, gpu_environment, gpu_shm_mib, [nofile, memlock])
    container = multinode.pop("containerProperties")
    multinode |= {
        "type": "multinode",
        "nodeProperties": {  # each submission overrides numNodes and the command
            "numNodes": 2,
            "mainNode": 0,
            "nodeRangeProperties": [{"targetNodes": "0:", "container": container}],
        },
    }
    return {
        "cpu": one("cpu", CPU_DEFAULTS, JOB_ENVIRONMENT, CPU_DEFAULTS["shm_mib"], [nofile]),
        "gpu": gpu,
        "multinode": multinode,
    }


def policy_document(bucket: str, prefix: str) -> dict:
    """deploy/aws/iam-policy.json with the bucket and prefix filled in."""
    text = (HERE / "iam-policy.json").read_text()
    return json.loads(text.replace("${BUCKET}", bucket).replace("${PREFIX}", prefix))


def ensure_bucket(s3, bucket: str, region: str, prefix: str) -> None:
    """Create the bucket if needed and make it hard to lose.

    The S3 storage plugin deletes a bucket once its last object goes (--delete-all-output, a
    failed first run): versioning keeps deleted objects as versions, so the bucket is never
    empty; a sentinel object outside the workflow prefix keeps it non-empty even without
    versioning; a bucket policy denies s3:DeleteBucket to every principal (the account root
    can still remove the policy on purpose)."""
    try:
        s3.head_bucket(Bucket=bucket)
        print(f"bucket s3://{bucket}: exists")
    except ClientError as err:
        if err.response["Error"]["Code"] not in ("404", "NoSuchBucket", "NotFound"):
            raise
        args = {"Bucket": bucket}
        if region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": region}
        s3.create_bucket(**args)
        print(f"bucket s3://{bucket}: created in {region}")
    s3.put_public_access_block(
        Bucket=bucket,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    keep_or_set_encryption(s3, bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    # Old versions of overwritten/deleted workflow outputs expire after 30 days.
    merge_lifecycle_rule(
        s3,
        bucket,
        {
            "ID": LIFECYCLE_RULE_ID,
            "Status": "Enabled",
            "Filter": {"Prefix": f"{prefix}/"},
            "NoncurrentVersionExpiration": {"NoncurrentDays": 30},
        },
    )
    s3.put_object(
        Bucket=bucket,
        Key=SENTINEL_KEY,
        Body=b"Keeps this bucket non-empty: the Snakemake S3 storage plugin deletes a bucket "
        b"whose last object it removes. Do not delete (see deploy/aws/README.md).\n",
    )
    merge_policy_statements(
        s3,
        bucket,
        [
            {
                "Sid": "RefragNeverDeleteBucket",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:DeleteBucket",
                "Resource": f"arn:aws:s3:::{bucket}",
            },
            {
                "Sid": "RefragKeepSentinel",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:DeleteObject",
                "Resource": f"arn:aws:s3:::{bucket}/{SENTINEL_KEY}",
            },
        ],
    )


def keep_or_set_encryption(s3, bucket: str) -> None:
    """SSE-S3 by default, unless the bucket already has its own (e.g. SSE-KMS): that stays."""
    try:
        rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]
        print(f"bucket s3://{bucket}: keeps its encryption {rules['Rules']}")
        return
    except ClientError as err:
        if err.response["Error"]["Code"] != "ServerSideEncryptionConfigurationNotFoundError":
            raise
    s3.put_bucket_encryption(
        Bucket=bucket,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
    )


def merge_lifecycle_rule(s3, bucket: str, rule: dict) -> None:
    """Add (or update) our lifecycle rule, keeping the bucket's other rules."""
    try:
        rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    except ClientError as err:
        if err.response["Error"]["Code"] != "NoSuchLifecycleConfiguration":
            raise
        rules = []
    rules = [r for r in rules if r.get("ID") != rule["ID"]] + [rule]
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})


def merge_policy_statements(s3, bucket: str, statements: list[dict]) -> None:
    """Add (or update, by Sid) our statements, keeping the bucket policy's other statements."""
    try:
        policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
    except ClientError as err:
        if err.response["Error"]["Code"] != "NoSuchBucketPolicy":
            raise
        policy = {"Version": "2012-10-17", "Statement": []}
    ours = {s["Sid"] for s in statements}
    kept = policy.get("Statement", [])
    kept = [kept] if isinstance(kept, dict) else kept
    policy["Statement"] = [s for s in kept if s.get("Sid") not in ours] + statements
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


def ensure_job_role(iam, name: str, bucket: str, prefix: str) -> str:
    """The role Batch jobs assume (ECS tasks): S3 access to the workflow prefix, nothing else."""
    role = f"{name}-batch-job"
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "ecs-tasks.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ],
    }
    try:
        arn = iam.get_role(RoleName=role)["Role"]["Arn"]
    except ClientError as err:
        if err.response["Error"]["Code"] != "NoSuchEntity":
            raise
        arn = iam.create_role(
            RoleName=role,
            AssumeRolePolicyDocument=json.dumps(trust),
            Description="refrag-workflow AWS Batch jobs",
        )["Role"]["Arn"]
    iam.put_role_policy(
        RoleName=role,
        PolicyName=f"{name}-workflow-s3",
        PolicyDocument=json.dumps(policy_document(bucket, prefix)),
    )
    iam.put_role_policy(
        RoleName=role,
        PolicyName=f"{name}-multinode-submit",
        PolicyDocument=json.dumps(multinode_submit_policy(name)),
    )
    print(f"job role {arn}: policy deploy/aws/iam-policy.json on s3://{bucket}/{prefix}")
    return arn


def multinode_submit_policy(name: str) -> dict:
    """What a training rule on N > 1 nodes does from inside its job (refrag.train.batch):
    submit a job of the multinode definition to the set-up's queue, follow it, end it."""
    batch = "arn:aws:batch:*:*"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "SubmitMultinodeTraining",
                "Effect": "Allow",
                "Action": ["batch:SubmitJob", "batch:TagResource"],
                "Resource": [
                    f"{batch}:job-queue/{name}-queue",
                    f"{batch}:job-definition/{name}-multinode",
                    f"{batch}:job-definition/{name}-multinode:*",
                    f"{batch}:job/*",
                ],
            },
            {
                "Sid": "FollowAndEndIt",
                "Effect": "Allow",
                "Action": ["batch:DescribeJobs", "batch:TerminateJob"],
                "Resource": "*",
            },
        ],
    }


def ensure_compute_environment(batch, args) -> str:
    if args.compute_environment:
        return args.compute_environment
    name = f"{args.name}-ce"
    found = batch.describe_compute_environments(computeEnvironments=[name])
    if found["computeEnvironments"]:
        return name
    if not (args.subnets and args.security_groups and args.instance_role):
        sys.exit(
            "setup_batch.py: give --compute-environment, or --subnets, --security-groups "
            "and --instance-role to create a managed one"
        )
    batch.create_compute_environment(
        computeEnvironmentName=name,
        type="MANAGED",
        state="ENABLED",
        computeResources={
            "type": "EC2",
            "allocationStrategy": "BEST_FIT_PROGRESSIVE",
            "minvCpus": 0,
            "maxvCpus": args.max_vcpus,
            "instanceTypes": args.instance_types.split(","),
            "subnets": args.subnets.split(","),
            "securityGroupIds": args.security_groups.split(","),
            "instanceRole": args.instance_role,
            # the GPU-optimised ECS AMI (NVIDIA driver + container runtime) for GPU instances
            "ec2Configuration": [{"imageType": "ECS_AL2023_NVIDIA"}, {"imageType": "ECS_AL2023"}],
        },
    )
    print(f"compute environment {name}: created ({args.instance_types})")
    return name


def ensure_queue(batch, name: str, compute_environment: str) -> str:
    queue = f"{name}-queue"
    found = batch.describe_compute_environments(computeEnvironments=[compute_environment])
    arns = [c["computeEnvironmentArn"] for c in found["computeEnvironments"]]
    order = [{"order": 1, "computeEnvironment": (arns or [compute_environment])[0]}]
    found = batch.describe_job_queues(jobQueues=[queue])["jobQueues"]
    if found:
        batch.update_job_queue(jobQueue=queue, state="ENABLED", computeEnvironmentOrder=order)
    else:
        batch.create_job_queue(
            jobQueueName=queue, state="ENABLED", priority=1, computeEnvironmentOrder=order
        )
    print(f"job queue {queue} -> {compute_environment}")
    return queue


def head_commit() -> str | None:
    """This checkout's HEAD, or None outside a git checkout."""
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--region", required=True)
    parser.add_argument("--bucket", required=True, help="S3 bucket for inputs/outputs")
    parser.add_argument("--prefix", default="refrag-workflow", help="key prefix of all files")
    parser.add_argument("--image", required=True, help="image URI built from ./Dockerfile")
    parser.add_argument("--name", default="refrag", help="prefix of every AWS resource name")
    parser.add_argument(
        "--image-commit",
        help="git commit the image was built from (its GIT_COMMIT build argument); "
        "default: this checkout's HEAD. Snakemake refuses to run a different work tree.",
    )
    parser.add_argument("--job-role-arn", help="use this job role instead of creating one")
    parser.add_argument("--execution-role-arn", help="needed with --hf-token-secret-arn")
    parser.add_argument("--hf-token-secret-arn", help="Secrets Manager ARN injected as HF_TOKEN")
    parser.add_argument("--gpu-shm-mib", type=int, default=GPU_DEFAULTS["shm_mib"])
    parser.add_argument(
        "--shared-efs", help="EFS file system id mounted in every job (multi-node training)"
    )
    parser.add_argument("--shared-path", default="/shared", help="where it is mounted")
    parser.add_argument("--compute-environment", help="an existing compute environment")
    parser.add_argument("--subnets", help="comma-separated, to create a managed environment")
    parser.add_argument("--security-groups", help="comma-separated")
    parser.add_argument("--instance-role", help="ECS instance profile name or ARN")
    parser.add_argument("--instance-types", default="p4d.24xlarge,g5,m6i")
    parser.add_argument("--max-vcpus", type=int, default=768)
    parser.add_argument(
        "--deployment",
        type=Path,
        default=DEPLOYMENT,
        help="where the profile's settings are written",
    )
    args = parser.parse_args(argv)
    prefix = args.prefix.strip("/")
    session = boto3.session.Session(region_name=args.region)

    ensure_bucket(session.client("s3"), args.bucket, args.region, prefix)
    role = args.job_role_arn or ensure_job_role(
        session.client("iam"), args.name, args.bucket, prefix
    )
    batch = session.client("batch")
    registered = {}
    for kind, definition in job_definitions(
        args.name,
        args.image,
        role,
        args.execution_role_arn,
        args.hf_token_secret_arn,
        args.gpu_shm_mib,
        args.shared_efs,
        args.shared_path,
    ).items():
        out = batch.register_job_definition(**definition)
        registered[kind] = out["jobDefinitionName"]
        print(f"job definition {out['jobDefinitionArn']}")
    queue = ensure_queue(batch, args.name, ensure_compute_environment(batch, args))

    deployment = {
        "region": args.region,
        "bucket": args.bucket,
        "prefix": prefix,
        "image": args.image,
        "image_commit": args.image_commit or head_commit(),
        "job_queue": queue,
        "job_definitions": registered,
    }
    args.deployment.parent.mkdir(parents=True, exist_ok=True)
    args.deployment.write_text(
        "# Written by deploy/aws/setup_batch.py; read by profiles/aws-batch/config.yaml.\n"
        + yaml.safe_dump(deployment, sort_keys=False)
    )
    print(f"wrote {args.deployment}; now: snakemake --profile aws-batch eval_report")
    return deployment


if __name__ == "__main__":
    main()
