"""Two training "nodes" on one machine: the multi-node launch lines of
refrag.train.launch.launch_command run as written, two torchrun agents meeting over a c10d
rendezvous on 127.0.0.1, and train a tiny model (gloo, one CPU process per agent).

- Slurm: a stand-in `srun` starts the command once per node with the variables Slurm sets in
  each task (SLURM_NNODES, SLURM_JOB_NODELIST; SLURM_JOB_ID survives the jobstep) and a
  stand-in `scontrol show hostnames` names 127.0.0.1 as the first node;
- AWS Batch: two shells with the variables of a multi-node parallel job's nodes
  (AWS_BATCH_JOB_NUM_NODES, AWS_BATCH_JOB_ID; the main node's address variable set on the
  other node only, as Batch does; `hostname -i` stands in on the main node).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from refrag.modeling import RefragModel
from refrag.train.launch import Parallel, launch_command, node_command

FAKE_SRUN = """#!/usr/bin/env bash
# srun's stand-in: run the command once per node, side by side, with each task's variables
nodes=1
while [[ $1 == --* ]]; do
    case $1 in --nodes=*) nodes=${1#--nodes=} ;; esac
    shift
done
pids=()
for ((i = 0; i < nodes; i++)); do
    SLURM_NNODES=$nodes SLURM_NODEID=$i SLURM_JOB_NODELIST="node[1-$nodes]" "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/sh
# `scontrol show hostnames LIST`: the nodes of the allocation, the first one here
[ "$1 $2" = "show hostnames" ] && printf '127.0.0.1\\n127.0.0.2\\n'
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(tiny_checkpoint: Path, shards: Path, out: Path, ranks: Path) -> str:
    hp = json.dumps({"steps": 2, "batch_size": 2, "save_steps": 2})
    return (
        f"-m refrag.cli train --stage cpt --k 4 --init {tiny_checkpoint} --data {shards} "
        f"--out {out} --hp '{hp}' --rank-log-dir {ranks}"
    )


def check_two_node_run(result: subprocess.CompletedProcess, out: Path, ranks: Path) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in ranks.glob("run-*.log")) == ["run-0.log", "run-1.log"]
    log = json.loads((out / "training_log.json").read_text())
    assert log["parallel"]["world_size"] == 2, log["parallel"]
    assert log["parallel"]["distributed_type"] == "MULTI_CPU"
    assert log["log_history"][-1]["step"] == 2
    assert RefragModel.from_pretrained(out).config.compression == 4


@pytest.mark.slow
def test_two_slurm_nodes_rendezvous_over_c10d_and_train(tiny_checkpoint, shards, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    parallel = Parallel(nodes=2, gpus_per_node=1)  # one process per "node", on the CPU
    command = launch_command(sys.executable, parallel, port=free_port())
    assert command.startswith("srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=1 bash -c")
    out, ranks = tmp_path / "cpt", tmp_path / "ranks"
    env = os.environ | {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    result = subprocess.run(
        f"{command} {train_args(tiny_checkpoint, shards, out, ranks)}",
        shell=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    check_two_node_run(result, out, ranks)


@pytest.mark.slow
def test_two_aws_batch_nodes_rendezvous_over_c10d_and_train(tiny_checkpoint, shards, tmp_path):
    parallel = Parallel(nodes=2, gpus_per_node=1, multinode="aws-batch")
    command = node_command(sys.executable, parallel, port=free_port())  # what each node runs
    out, ranks = tmp_path / "cpt", tmp_path / "ranks"
    args = train_args(tiny_checkpoint, shards, out, ranks)
    batch = {"AWS_BATCH_JOB_NUM_NODES": "2", "AWS_BATCH_JOB_ID": "job-1"}
    main_ip = subprocess.run(["hostname", "-i"], capture_output=True, text=True).stdout.split()
    if len(main_ip) != 1:
        pytest.skip(f"`hostname -i` gives {main_ip}: not one address of the main node")
    nodes = [
        subprocess.Popen(  # the main node: no address variable of its own (as on Batch)
            f"{command} {args}",
            shell=True,
            env=os.environ | batch,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            f"{command} {args}",
            shell=True,
            env=os.environ | batch | {"AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS": main_ip[0]},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ),
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    codes = [node.returncode for node in nodes]
    result = subprocess.CompletedProcess("two nodes", max(codes), "\n".join(outputs), "")
    check_two_node_run(result, out, ranks)
