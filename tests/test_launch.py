"""The parallel block and the one launcher of every training job."""

from __future__ import annotations

import pytest

from refrag.train.launch import Parallel, ParallelError, launch_command, run_parallel


def test_cpu_and_one_gpu_run_inline_and_one_node_runs_torchrun_standalone():
    assert launch_command("py", Parallel()) == "py"
    assert launch_command("py", Parallel(gpus_per_node=1)) == "py"
    assert launch_command("py", Parallel(gpus_per_node=8)) == (
        "py -m torch.distributed.run --standalone --nproc_per_node=8"
    )


def test_n_nodes_start_one_torchrun_agent_per_node_with_a_c10d_rendezvous():
    slurm = launch_command("py", Parallel(nodes=8, gpus_per_node=8))
    assert slurm.startswith("srun --nodes=8 --ntasks-per-node=1 --gpus-per-node=8 bash -c ")
    assert "--nnodes=$SLURM_NNODES --nproc-per-node=8" in slurm
    assert "--rdzv-backend=c10d --rdzv-endpoint=$head:29500" in slurm
    aws = launch_command("py", Parallel(nodes=2, gpus_per_node=8, multinode="aws-batch"))
    assert "--nnodes=$AWS_BATCH_JOB_NUM_NODES" in aws
    assert "AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS:-$(hostname -i)" in aws


def test_a_run_lays_its_gpus_and_parallel_over_the_config_block():
    config = {"parallel": {"strategy": "fsdp", "gpus_per_node": 8, "nodes": 2}}
    assert run_parallel(config, {}).world_size == 16
    assert run_parallel(config, {"gpus": 4}).gpus_per_node == 4
    own = run_parallel(config, {"gpus": 4, "parallel": {"nodes": 1, "strategy": "ddp"}})
    assert (own.nodes, own.gpus_per_node, own.strategy) == (1, 4, "ddp")
    assert run_parallel({}, {}) == Parallel()  # the default: CPU, inline, as before


def test_impossible_settings_are_refused_in_one_line():
    with pytest.raises(ParallelError, match="unknown parallel settings: gpu"):
        run_parallel({"parallel": {"gpu": 1}}, {})
    with pytest.raises(ParallelError, match="nodes=2 needs gpus_per_node"):
        run_parallel({"parallel": {"nodes": 2}}, {})
