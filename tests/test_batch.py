"""refrag.train.batch: an AWS Batch multi-node parallel job submitted and waited for, against
moto (in process, no Docker: jobs succeed at submission) with the job definition
deploy/aws/setup_batch.py registers; failures, lost jobs and interruptions with a stub."""

from __future__ import annotations

import shlex
import sys

import boto3
import pytest
import yaml
from moto import mock_aws

from refrag.cli import main
from refrag.train import batch
from refrag.train.batch import BatchJobError, MultinodeJob
from refrag.train.launch import Parallel, launch_command

from .conftest_profiles import REPO

sys.path.insert(0, str(REPO / "deploy" / "aws"))
import setup_batch  # noqa: E402

REGION = "eu-west-1"


@pytest.fixture
def moto_batch(monkeypatch):
    """A Batch queue and the set-up's job definitions in moto; the submissions recorded."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws(config={"batch": {"use_docker": False}}):
        session = boto3.session.Session(region_name=REGION)
        role = session.client("iam").create_role(RoleName="job", AssumeRolePolicyDocument="{}")
        client = session.client("batch")
        environment = client.create_compute_environment(
            computeEnvironmentName="test-ce",
            type="UNMANAGED",
            state="ENABLED",
            serviceRole=role["Role"]["Arn"],
        )["computeEnvironmentArn"]
        client.create_job_queue(
            jobQueueName="rf-queue",
            state="ENABLED",
            priority=1,
            computeEnvironmentOrder=[{"order": 1, "computeEnvironment": environment}],
        )
        for definition in setup_batch.job_definitions(
            "rf", "image:tag", role["Role"]["Arn"]
        ).values():
            client.register_job_definition(**definition)
        yield client


def record_submissions(client) -> list[dict]:
    seen: list[dict] = []
    client.meta.events.register(
        "provide-client-params.batch.SubmitJob", lambda params, **_: seen.append(params)
    )
    return seen


def test_the_multinode_definition_runs_the_gpu_container_on_every_node_with_the_retries(
    moto_batch,
):
    (definition,) = moto_batch.describe_job_definitions(
        jobDefinitionName="rf-multinode", status="ACTIVE"
    )["jobDefinitions"]
    assert definition["type"] == "multinode"
    conditions = definition["retryStrategy"]["evaluateOnExit"]  # moto lowercases actions
    assert [c | {"action": c["action"].upper()} for c in conditions] == setup_batch.RETRY_ON
    job_id = moto_batch.submit_job(
        jobName="probe", jobQueue="rf-queue", jobDefinition="rf-multinode"
    )["jobId"]
    (described,) = moto_batch.describe_jobs(jobs=[job_id])["jobs"]  # moto shows it here
    nodes = described["nodeProperties"]
    assert (nodes["mainNode"], nodes["nodeRangeProperties"][0]["targetNodes"]) == (0, "0:")
    container = nodes["nodeRangeProperties"][0]["container"]
    assert container["image"] == "image:tag"
    assert container["linuxParameters"]["sharedMemorySize"] >= 65536
    assert {"name": "memlock", "softLimit": -1, "hardLimit": -1} in container["ulimits"]


def test_a_job_on_two_nodes_is_submitted_with_its_node_overrides_and_waited_for(moto_batch):
    seen = record_submissions(moto_batch)
    job = MultinodeJob(
        name="train-k16-cpt",
        job_queue="rf-queue",
        job_definition="rf-multinode",
        nodes=2,
        gpus_per_node=8,
        vcpu_per_node=64,
        memory_mib_per_node=8 * 61440,
        workdir="/shared/work",
    )
    described = batch.run(moto_batch, job, "torchrun … -m refrag.cli train", poll_s=0.01)
    assert described["status"] == "SUCCEEDED"
    (submitted,) = seen
    overrides = submitted["nodeOverrides"]
    assert overrides["numNodes"] == 2
    (node,) = overrides["nodePropertyOverrides"]
    assert node["targetNodes"] == "0:"
    container = node["containerOverrides"]
    assert container["command"] == [
        "bash",
        "-c",
        "cd /shared/work && torchrun … -m refrag.cli train",
    ]
    assert {r["type"]: r["value"] for r in container["resourceRequirements"]} == {
        "VCPU": "64",
        "MEMORY": str(8 * 61440),
        "GPU": "8",
    }


def test_the_training_rules_launch_line_submits_through_the_cli(moto_batch, tmp_path, monkeypatch):
    """launch_command's AWS Batch form, parsed as the rule's shell would, reaches Batch with
    the node's torchrun line intact (its $AWS_BATCH_* variables for the node to expand)."""
    deployment = tmp_path / "deployment.yaml"
    deployment.write_text(
        yaml.safe_dump(
            {
                "region": REGION,
                "job_queue": "rf-queue",
                "job_definitions": {"multinode": "rf-multinode"},
            }
        )
    )
    monkeypatch.setenv("REFRAG_AWS_DEPLOYMENT", str(deployment))
    seen = record_submissions(moto_batch)
    monkeypatch.setattr(batch.boto3.session.Session, "client", lambda self, name: moto_batch)
    line = launch_command("python", Parallel(nodes=2, gpus_per_node=8, multinode="aws-batch"))
    argv = shlex.split(f"{line} -m refrag.cli train --stage cpt --out 'a b'")
    assert argv[:3] == ["python", "-m", "refrag.cli"]
    main([*argv[3:5], "--poll-s", "0.01", *argv[5:]])
    command = seen[0]["nodeOverrides"]["nodePropertyOverrides"][0]["containerOverrides"]["command"]
    assert "--nnodes=$AWS_BATCH_JOB_NUM_NODES --nproc-per-node=8" in command[2]
    assert command[2].endswith("-m refrag.cli train --stage cpt --out 'a b'")


class StubBatch:
    """describe_jobs answers from a list of job states (None: unknown); records terminations."""

    def __init__(self, states: list[dict | None]):
        self.states, self.terminated = list(states), []

    def submit_job(self, **kwargs):
        return {"jobId": "job-1"}

    def describe_jobs(self, jobs):
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"jobs": [] if state is None else [state]}

    def terminate_job(self, jobId, reason):
        self.terminated.append((jobId, reason))


JOB = MultinodeJob("train", "q", "rf-multinode", 2, 8, 64, 491520)


def test_a_failed_job_is_one_line_with_its_reason_and_exit_code():
    failed = {
        "jobId": "job-1",
        "jobName": "train",
        "status": "FAILED",
        "statusReason": "Essential container in task exited",
        "attempts": [{"container": {"exitCode": 1}}] * 3,
        "nodeProperties": {"numNodes": 2},
    }
    stub = StubBatch([{"jobId": "job-1", "status": "RUNNABLE"}, failed])
    with pytest.raises(BatchJobError) as err:
        batch.run(stub, JOB, "x", poll_s=0, sleep=lambda s: None)
    assert str(err.value) == (
        "multi-node job train job-1 (2 nodes) failed after 3 attempt(s): "
        "Essential container in task exited; exit code 1"
    )
    assert stub.terminated == []  # Batch ended it already


def test_a_job_unknown_to_batch_for_too_long_fails_and_is_terminated():
    now = [0.0]
    stub = StubBatch([{"jobId": "job-1", "status": "RUNNING"}, None])

    def sleep(seconds):
        now[0] += 60

    with pytest.raises(BatchJobError, match="job-1 unknown to AWS Batch for over 900 s"):
        batch.run(stub, JOB, "x", clock=lambda: now[0], sleep=sleep)
    assert stub.terminated == [("job-1", "refrag: lost track of the job")]


def test_an_interrupted_wait_terminates_the_job():
    stub = StubBatch([{"jobId": "job-1", "status": "RUNNING"}])

    def sleep(seconds):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batch.run(stub, JOB, "x", sleep=sleep)
    assert stub.terminated == [("job-1", "refrag: the rule was interrupted")]
