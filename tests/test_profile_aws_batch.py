"""profiles/aws-batch end to end, offline: a moto server on 127.0.0.1 serves Batch, S3 and IAM.

deploy/aws/setup_batch.py creates the bucket safeguards, job role, job definitions and queue;
`snakemake --profile aws-batch` then runs with the real executor plugin, which submits real
jobs against those definitions. A patch of the plugin's Batch client runs each submitted
job's command locally (in a fresh copy of the workflow, standing in for the image, with only
the environment the job definition and the submission carry, plus credentials standing in for
the job role), so the outputs really land in (moto) S3, and reports a failed local run as a
FAILED job. Nothing leaves 127.0.0.1: AWS_ENDPOINT_URL points every client at moto.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
import yaml

from .conftest_profiles import REPO, VENV, copy_worktree

REGION = "eu-west-1"
BUCKET = "refrag-test-bucket"
PREFIX = "refrag-workflow"
IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/refrag-workflow:test"
SECRET = "test-secret-key-must-not-travel"
NAME = "rf"  # not the default: the job definitions' names must come from deployment.yaml

DRIVER = '''
"""snakemake, with the AWS Batch client patched to run each submitted job here."""
import json, os, shutil, subprocess, sys
from pathlib import Path

from snakemake_executor_plugin_aws_basic_batch.batch_client import BatchClient

IMAGE = Path(os.environ["REFRAG_TEST_IMAGE_DIR"])
RUNS = Path(os.environ["REFRAG_TEST_RUNS"])
JOB_BASE_ENV = json.loads(os.environ["REFRAG_TEST_JOB_BASE_ENV"])
failed = {}
submit, describe = BatchClient.submit_job, BatchClient.describe_jobs


def run_locally(self, **kwargs):
    n = len(list(RUNS.glob("job-*.json")))
    defs = self.client.describe_job_definitions(
        jobDefinitionName=kwargs["jobDefinition"], status="ACTIVE")["jobDefinitions"]
    definition = max(defs, key=lambda d: d["revision"])
    overrides = kwargs["containerOverrides"]
    env = {e["name"]: e["value"] for e in definition["containerProperties"]["environment"]}
    env |= {e["name"]: e["value"] for e in overrides.get("environment", [])}
    workdir = RUNS / f"job-{n}"
    shutil.copytree(IMAGE, workdir, symlinks=True)
    proc = subprocess.run(overrides["command"], cwd=workdir, env=JOB_BASE_ENV | env,
                          capture_output=True, text=True)
    (RUNS / f"job-{n}.log").write_text(proc.stdout + proc.stderr)
    out = submit(self, **kwargs)
    if proc.returncode:
        failed[out["jobId"]] = proc.returncode
    record = {"submit": kwargs, "definition": definition, "returncode": proc.returncode}
    (RUNS / f"job-{n}.json").write_text(json.dumps(record, default=str))
    return out


def describe_with_local_result(self, **kwargs):
    out = describe(self, **kwargs)
    out["jobs"] = [j for j in out["jobs"] if "-lost_probe-" not in j["jobName"]]  # never found
    for job in out["jobs"]:
        if job["jobId"] in failed:
            job["status"] = "FAILED"
            job["statusReason"] = "local run failed"
            job.setdefault("container", {})["exitCode"] = failed[job["jobId"]]
    return out


BatchClient.submit_job, BatchClient.describe_jobs = run_locally, describe_with_local_result
from snakemake.cli import main

sys.exit(main(sys.argv[1:]))
'''

PROBE = """include: "Snakefile"

rule gpu_probe:
    output:
        "results/probe/gpu.txt",
    resources:
        **gpu_resources(8),
    shell:
        "echo probed > {output}"


rule fail_probe:
    output:
        "results/probe/fail.txt",
    log:
        "logs/probe/fail.log",
    shell:
        "echo the probe fails on purpose > {log}; exit 3"


rule lost_probe:
    output:
        "results/probe/lost.txt",
    shell:
        "touch {output}"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """A moto server on loopback (Batch without Docker: jobs succeed at submission)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path_factory.mktemp("moto") / "moto.log", "w") as log:
        server = subprocess.Popen(
            [str(VENV / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            for _ in range(100):
                try:
                    urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                pytest.fail("moto_server did not start")
            config = json.dumps({"batch": {"use_docker": False}}).encode()
            request = urllib.request.Request(f"{url}/moto-api/config", data=config, method="POST")
            urllib.request.urlopen(request, timeout=5)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=10)


@pytest.fixture(scope="module")
def aws_env(moto):
    """Credentials and endpoints of the test: every AWS client talks to moto only."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": moto,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, aws_env):
    """A work tree set up with deploy/aws/setup_batch.py against moto, plus its image copy."""
    root = tmp_path_factory.mktemp("aws")
    image = copy_worktree(root / "image")
    (image / "aws_probe.smk").write_text(PROBE)
    work = copy_worktree(root / "work")
    (work / "aws_probe.smk").write_text(PROBE)
    env = os.environ | aws_env
    session = boto3.session.Session(
        region_name=REGION, aws_access_key_id="testing", aws_secret_access_key=SECRET
    )
    iam, batch = (
        session.client(s, endpoint_url=aws_env["AWS_ENDPOINT_URL"]) for s in ("iam", "batch")
    )
    service_role = iam.create_role(
        RoleName="batch-service",
        AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": []}),
    )["Role"]["Arn"]
    batch.create_compute_environment(
        computeEnvironmentName="test-ce",
        type="UNMANAGED",
        state="ENABLED",
        serviceRole=service_role,
    )
    subprocess.run(
        [
            sys.executable,
            "deploy/aws/setup_batch.py",
            "--region",
            REGION,
            "--bucket",
            BUCKET,
            "--prefix",
            PREFIX,
            "--image",
            IMAGE,
            "--compute-environment",
            "test-ce",
            "--name",
            NAME,
        ],
        cwd=work,
        env=env,
        check=True,
    )
    return {"work": work, "image": image, "root": root, "env": env}


def run_snakemake(
    deployed, runs: Path, *args: str, env: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    runs.mkdir(exist_ok=True)
    (deployed["root"] / "driver.py").write_text(DRIVER)
    job_base_env = {  # the "instance": its PATH and network, the job role's credentials
        "PATH": f"{VENV / 'bin'}:/usr/bin:/bin",
        "HOME": str(runs),
        **{k: v for k, v in deployed["env"].items() if k.startswith("AWS_")},
    }
    env = (env or deployed["env"]) | {
        "REFRAG_TEST_IMAGE_DIR": str(deployed["image"]),
        "REFRAG_TEST_RUNS": str(runs),
        "REFRAG_TEST_JOB_BASE_ENV": json.dumps(job_base_env),
    }
    return subprocess.run(
        [
            sys.executable,
            str(deployed["root"] / "driver.py"),
            "--profile",
            "aws-batch",
            "--snakefile",
            "aws_probe.smk",
            *args,
        ],
        cwd=cwd or deployed["work"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def submissions(runs: Path) -> list[dict]:
    """The recorded submissions, in order."""
    paths = sorted(runs.glob("job-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [json.loads(p.read_text()) for p in paths]


def submitted(runs: Path) -> dict[str, dict]:
    """The recorded submissions, by rule name (the last one of a rule)."""
    return {r["submit"]["jobName"].split("-")[1]: r for r in submissions(runs)}


def requirements(items: list[dict]) -> dict[str, str]:
    return {r["type"]: r["value"] for r in items}


@pytest.fixture(scope="module")
def workflow_run(deployed):
    runs = deployed["root"] / "runs"
    proc = run_snakemake(deployed, runs, "hello_dist", "gpu_probe")
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(runs.glob("job-*.log")))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:] + logs
    return submitted(runs)


def client(deployed, service: str):
    """A boto3 client of the moto server."""
    return boto3.client(
        service,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key=SECRET,
        endpoint_url=deployed["env"]["AWS_ENDPOINT_URL"],
    )


def s3(deployed):
    return client(deployed, "s3")


@pytest.mark.slow
def test_setup_registers_gpu_and_cpu_job_definitions(deployed):
    batch = client(deployed, "batch")
    defs = {
        d["jobDefinitionName"]: d
        for d in batch.describe_job_definitions(status="ACTIVE")["jobDefinitions"]
    }
    gpu, cpu = defs[f"{NAME}-gpu"], defs[f"{NAME}-cpu"]
    for d in (gpu, cpu):
        props = d["containerProperties"]
        assert props["image"] == IMAGE
        assert props["jobRoleArn"].endswith(f"role/{NAME}-batch-job")
        assert not props.get("privileged")
        env = {e["name"]: e["value"] for e in props["environment"]}
        assert not [k for k in env if any(w in k for w in ("SECRET", "TOKEN", "KEY", "PASS"))]
        assert SECRET not in json.dumps(d)
    props = gpu["containerProperties"]
    assert requirements(props["resourceRequirements"])["GPU"] == "1"
    assert props["linuxParameters"]["sharedMemorySize"] >= 65536
    assert {"name": "memlock", "softLimit": -1, "hardLimit": -1} in props["ulimits"]
    assert gpu["timeout"]["attemptDurationSeconds"] == 86400
    deployment = yaml.safe_load(
        (deployed["work"] / "profiles/aws-batch/deployment.yaml").read_text()
    )
    assert deployment["job_definitions"] == {
        "cpu": f"{NAME}-cpu",
        "gpu": f"{NAME}-gpu",
        "multinode": f"{NAME}-multinode",
    }
    assert deployment["job_queue"] == f"{NAME}-queue"
    policies = client(deployed, "iam").list_role_policies(RoleName=f"{NAME}-batch-job")
    assert set(policies["PolicyNames"]) == {f"{NAME}-workflow-s3", f"{NAME}-multinode-submit"}


@pytest.mark.slow
def test_bucket_has_safeguards(deployed):
    client = s3(deployed)
    assert client.get_bucket_versioning(Bucket=BUCKET)["Status"] == "Enabled"
    policy = json.loads(client.get_bucket_policy(Bucket=BUCKET)["Policy"])
    assert any(
        s["Effect"] == "Deny" and s["Action"] == "s3:DeleteBucket" for s in policy["Statement"]
    )
    client.head_object(Bucket=BUCKET, Key=".refrag-bucket-sentinel")


@pytest.mark.slow
def test_gpu_rule_gets_gpus_cpus_memory_a_day_and_the_gpu_definition(workflow_run):
    job = workflow_run["gpu_probe"]["submit"]
    assert job["jobDefinition"] == f"{NAME}-gpu"  # read from deployment.yaml
    assert job["jobQueue"] == f"{NAME}-queue"
    assert requirements(job["containerOverrides"]["resourceRequirements"]) == {
        "VCPU": "64",
        "MEMORY": str(8 * 61440),
        "GPU": "8",
    }
    assert job["timeout"] == {"attemptDurationSeconds": 86400}
    assert (
        workflow_run["gpu_probe"]["definition"]["containerProperties"]["linuxParameters"][
            "sharedMemorySize"
        ]
        >= 65536
    )


@pytest.mark.slow
def test_cpu_rule_gets_profile_defaults_not_one_vcpu(workflow_run):
    job = workflow_run["hello_dist"]["submit"]
    assert job["jobDefinition"] == f"{NAME}-cpu"
    assert requirements(job["containerOverrides"]["resourceRequirements"]) == {
        "VCPU": "2",
        "MEMORY": "8192",
    }
    assert job["timeout"] == {"attemptDurationSeconds": 14400}


@pytest.mark.slow
def test_submitted_environment_carries_no_secrets(workflow_run):
    for record in workflow_run.values():
        env = {e["name"]: e["value"] for e in record["submit"]["containerOverrides"]["environment"]}
        assert SECRET not in json.dumps(record)
        assert not {k for k in env if "SECRET" in k or "ACCESS_KEY" in k or k.endswith("TOKEN")}
        assert "AWS_ACCESS_KEY_ID" not in env


@pytest.mark.slow
def test_outputs_land_in_s3(workflow_run, deployed):
    body = s3(deployed).get_object(Bucket=BUCKET, Key=f"{PREFIX}/results/hello_dist/world.json")
    world = json.loads(body["Body"].read())
    assert world["world_size"] == 2 and world["all_reduce_sum"] == world["expected_sum"]
    probe = s3(deployed).get_object(Bucket=BUCKET, Key=f"{PREFIX}/results/probe/gpu.txt")
    assert probe["Body"].read() == b"probed\n"
    assert all(r["returncode"] == 0 for r in workflow_run.values())


@pytest.mark.slow
def test_job_definitions_retry_lost_hosts_and_pulls_but_not_job_errors(deployed):
    batch = client(deployed, "batch")
    for kind in ("cpu", "gpu"):
        (definition,) = batch.describe_job_definitions(
            jobDefinitionName=f"{NAME}-{kind}", status="ACTIVE"
        )["jobDefinitions"][-1:]
        strategy = definition["retryStrategy"]
        assert strategy["attempts"] >= 2
        conditions = strategy["evaluateOnExit"]
        retried = {
            c.get("onStatusReason") or c.get("onReason")
            for c in conditions
            if c["action"].upper() == "RETRY"
        }
        assert {"Host EC2*", "CannotPullContainerError*"} <= retried
        last = conditions[-1]  # anything else, i.e. the job's own failure, is not retried
        assert (last["onReason"], last["action"].upper()) == ("*", "EXIT")


@pytest.mark.slow
def test_a_failing_job_is_retried_then_fails_the_run_naming_its_log(deployed):
    runs = deployed["root"] / "runs-fail"
    proc = run_snakemake(deployed, runs, "fail_probe")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    attempts = [r for r in submissions(runs) if "-fail_probe-" in r["submit"]["jobName"]]
    assert len(attempts) == 2 and all(r["returncode"] != 0 for r in attempts)  # retries: 1
    assert "AWS Batch job failed. Code: 1" in output
    assert f"s3://{BUCKET}/{PREFIX}/logs/probe/fail.log" in output  # where its log is
    log = s3(deployed).get_object(Bucket=BUCKET, Key=f"{PREFIX}/logs/probe/fail.log")
    assert log["Body"].read() == b"the probe fails on purpose\n"


@pytest.mark.slow
def test_a_job_the_status_check_cannot_find_fails_after_the_limit(deployed):
    runs = deployed["root"] / "runs-lost"
    env = deployed["env"] | {"REFRAG_AWS_UNKNOWN_LIMIT_S": "3"}
    proc = run_snakemake(deployed, runs, "lost_probe", "--retries", "0", env=env)
    assert proc.returncode != 0
    assert "no status for 3 s" in proc.stdout + proc.stderr
    assert "aws batch terminate-job --job-id" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_missing_credentials_stop_the_run_in_one_line(deployed, tmp_path):
    env = {k: v for k, v in deployed["env"].items() if not k.startswith("AWS_")}
    env |= {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": deployed["env"]["AWS_ENDPOINT_URL"],
    }
    proc = subprocess.run(
        [str(VENV / "bin" / "snakemake"), "--profile", "aws-batch", "-n", "eval_report"],
        cwd=deployed["work"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) <= 2  # Snakemake's "Using profiles …", then ours: no traceback
    assert lines[-1:] == [
        "aws-batch: no AWS credentials found (set AWS_PROFILE, run `aws sso login`, or export "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY); nothing was submitted"
    ]


def test_expired_credentials_are_named_in_one_line():
    from botocore.stub import Stubber

    sys.path.insert(0, str(REPO / "deploy" / "aws"))
    import preflight

    sts = boto3.client("sts", region_name=REGION, aws_access_key_id="a", aws_secret_access_key="b")
    with Stubber(sts) as stub:
        stub.add_client_error(
            "get_caller_identity",
            service_error_code="ExpiredToken",
            service_message="The security token included in the request is expired",
            http_status_code=403,
        )
        with pytest.raises(SystemExit) as stopped:
            preflight.check_credentials(sts)
    assert str(stopped.value).startswith("aws-batch: AWS refused the credentials (ExpiredToken: ")


def git(work: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.mark.slow
def test_a_work_tree_the_image_was_not_built_from_is_refused(deployed, tmp_path):
    work = copy_worktree(tmp_path / "work")
    deployment_path = work / "profiles/aws-batch/deployment.yaml"
    deployment = yaml.safe_load(
        (deployed["work"] / "profiles/aws-batch/deployment.yaml").read_text()
    )
    git(work, "init", "-q")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "image")
    built = git(work, "rev-parse", "HEAD")

    def dry_run(image_commit):
        deployment_path.write_text(yaml.safe_dump(deployment | {"image_commit": image_commit}))
        return subprocess.run(
            [str(VENV / "bin" / "snakemake"), "--profile", "aws-batch", "-n", "hello_dist"],
            cwd=work,
            env=deployed["env"],
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert dry_run(built).returncode == 0
    stale = dry_run("0" * 40)
    assert stale.returncode == 1
    assert f"holds commit 000000000000, the work tree is at {built[:12]}" in stale.stderr
    (work / "workflow/rules/common.smk").write_text(
        (work / "workflow/rules/common.smk").read_text() + "\n# changed\n"
    )
    dirty = dry_run(built)
    assert dirty.returncode == 1
    assert "uncommitted changes the image does not hold (workflow/rules/common.smk)" in dirty.stderr


@pytest.mark.slow
def test_setup_keeps_the_users_bucket_policy_lifecycle_encryption_and_keys(deployed, tmp_path):
    client = s3(deployed)
    bucket = "users-own-bucket"
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    client.put_object(Bucket=bucket, Key="unrelated/data.csv", Body=b"a,b\n1,2\n")
    users_statement = {
        "Sid": "UsersReadOnlyRole",
        "Effect": "Allow",
        "Principal": {"AWS": "arn:aws:iam::123456789012:role/reader"},
        "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{bucket}/unrelated/*",
    }
    client.put_bucket_policy(
        Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [users_statement]})
    )
    users_rule = {
        "ID": "users-archive",
        "Status": "Enabled",
        "Filter": {"Prefix": "unrelated/"},
        "Transitions": [{"Days": 90, "StorageClass": "GLACIER"}],
    }
    client.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": [users_rule]}
    )
    kms = {
        "Rules": [
            {
                "ApplyServerSideEncryptionByDefault": {
                    "SSEAlgorithm": "aws:kms",
                    "KMSMasterKeyID": "arn:aws:kms:eu-west-1:123456789012:key/users-key",
                }
            }
        ]
    }
    client.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration=kms)
    for _ in range(2):  # idempotent: a rerun adds nothing twice
        proc = subprocess.run(
            [
                sys.executable,
                "deploy/aws/setup_batch.py",
                "--region",
                REGION,
                "--bucket",
                bucket,
                "--image",
                IMAGE,
                "--compute-environment",
                "test-ce",
                "--name",
                "users",
                "--deployment",
                str(tmp_path / "deployment.yaml"),
            ],
            cwd=deployed["work"],
            env=deployed["env"],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        client.get_object(Bucket=bucket, Key="unrelated/data.csv")["Body"].read() == b"a,b\n1,2\n"
    )
    statements = json.loads(client.get_bucket_policy(Bucket=bucket)["Policy"])["Statement"]
    assert users_statement["Sid"] in [s["Sid"] for s in statements]
    assert sorted(s["Sid"] for s in statements) == sorted(
        ["UsersReadOnlyRole", "RefragNeverDeleteBucket", "RefragKeepSentinel"]
    )
    rules = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert sorted(r["ID"] for r in rules) == ["refrag-expire-old-versions", "users-archive"]
    encryption = client.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]
    default = encryption["Rules"][0]["ApplyServerSideEncryptionByDefault"]
    assert default["SSEAlgorithm"] == "aws:kms" and default["KMSMasterKeyID"].endswith("users-key")
    client.head_object(Bucket=bucket, Key=".refrag-bucket-sentinel")


@pytest.mark.slow
def test_delete_all_output_keeps_the_bucket(workflow_run, deployed):
    proc = run_snakemake(
        deployed, deployed["root"] / "runs-delete", "--delete-all-output", "hello_dist", "gpu_probe"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = s3(deployed)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert f"{PREFIX}/results/hello_dist/world.json" not in keys
    assert ".refrag-bucket-sentinel" in keys  # so the plugin left the bucket alone
    client.head_bucket(Bucket=BUCKET)


# -- the profile from any folder; the Batch resources it submits to are checked at start-up ----
def test_the_profile_finds_its_own_files_from_another_folder(tmp_path, monkeypatch):
    from snakemake.profiles import ProfileConfigFileParser

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REFRAG_AWS_DEPLOYMENT", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the profile prepends deploy/aws
    deployment = REPO / "profiles" / "aws-batch" / "deployment.yaml"
    if deployment.exists():
        pytest.skip("a real deployment.yaml is present")
    profile = REPO / "profiles" / "aws-batch" / "config.yaml"
    with open(profile) as stream, pytest.raises(SystemExit) as stopped:
        ProfileConfigFileParser().parse(stream)
    assert str(stopped.value) == (
        f"aws-batch: {deployment} not found: run deploy/aws/setup_batch.py first "
        "(deploy/aws/README.md)"
    )


def batch_stub(queue: list[dict], definitions: dict[str, list]):
    from botocore.stub import Stubber

    batch = boto3.client(
        "batch", region_name=REGION, aws_access_key_id="a", aws_secret_access_key="b"
    )
    stub = Stubber(batch)
    stub.add_response("describe_job_queues", {"jobQueues": queue}, {"jobQueues": ["rf-queue"]})
    for name, found in definitions.items():
        stub.add_response(
            "describe_job_definitions",
            {"jobDefinitions": found},
            {"jobDefinitionName": name, "status": "ACTIVE"},
        )
    return batch, stub


def test_a_deployment_without_its_queue_or_job_definitions_stops_in_one_line():
    sys.path.insert(0, str(REPO / "deploy" / "aws"))
    import preflight

    deployment = {
        "region": REGION,
        "job_queue": "rf-queue",
        "job_definitions": {"cpu": "rf-cpu", "gpu": "rf-gpu"},
    }
    queue = {
        "jobQueueName": "rf-queue",
        "jobQueueArn": "arn:aws:batch:eu-west-1:123456789012:job-queue/rf-queue",
        "state": "ENABLED",
        "status": "VALID",
        "priority": 1,
        "computeEnvironmentOrder": [],
    }
    definition = {
        "jobDefinitionName": "rf-cpu",
        "jobDefinitionArn": "arn:aws:batch:eu-west-1:123456789012:job-definition/rf-cpu:1",
        "revision": 1,
        "type": "container",
    }
    cases = [
        ([], {}, "aws-batch: job queue rf-queue does not exist in eu-west-1: rerun "),
        ([queue | {"state": "DISABLED"}], {}, "aws-batch: job queue rf-queue is DISABLED/VALID"),
        (
            [queue],
            {"rf-cpu": [definition], "rf-gpu": []},
            "aws-batch: job definition rf-gpu (gpu) has no ACTIVE revision in eu-west-1: rerun ",
        ),
    ]
    for found, definitions, message in cases:
        batch, stub = batch_stub(found, definitions)
        with stub, pytest.raises(SystemExit) as stopped:
            preflight.check_batch_resources(batch, deployment)
        assert str(stopped.value).startswith(message) and "\n" not in str(stopped.value)
    batch, stub = batch_stub([queue], {"rf-cpu": [definition], "rf-gpu": [definition]})
    with stub:
        preflight.check_batch_resources(batch, deployment)  # all there: passes
