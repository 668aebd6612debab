"""How a training job spreads over machines: the config's ``parallel`` block and the one
command line that launches any training job.

:class:`Parallel` is the block (``nodes``, ``gpus_per_node``, ``strategy``,
``activation_checkpointing``, ``mixed_precision``, ``gpu_memory_gib``, ``multinode``,
``compile``); a run's settings are the config's top-level ``parallel``, then the run's
``gpus`` (shorthand for ``gpus_per_node``), then the run's own ``parallel``
(:func:`run_parallel`).

:func:`launch_command` is what every training rule puts before ``-m refrag.cli train``:

- no GPU, or one: the Python itself (inline, one process);
- one node, G > 1 GPUs: ``torchrun --standalone --nproc_per_node=G``;
- N > 1 nodes: one torchrun agent per node, rendezvous over c10d at the first node: under
  Slurm through ``srun --nodes=N --ntasks-per-node=1`` (the rule needs ``mpi="srun"``); on
  AWS Batch the rule submits a multi-node parallel job and waits for it
  (``refrag batch-multinode``, :mod:`refrag.train.batch`), each node running
  :func:`node_command` with the job's ``AWS_BATCH_JOB_*`` variables.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields
from typing import Any, Literal

RDZV_PORT = 29500


class ParallelError(ValueError):
    """Parallel settings that cannot run (one line: what and why)."""


@dataclass(frozen=True)
class Parallel:
    """One run's parallel settings (the config's ``parallel`` block)."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU
    strategy: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False
    mixed_precision: Literal["bf16", "no"] = "bf16"  # bf16 only where the card supports it
    gpu_memory_gib: float = 80.0
    multinode: Literal["slurm", "aws-batch"] = "slurm"
    compile: bool = False  # torch.compile the model (GPUs: fewer launches per step)

    @property
    def gpus(self) -> int:
        """GPUs of the whole job."""
        return self.nodes * self.gpus_per_node

    @property
    def world_size(self) -> int:
        """Training processes: one per GPU, one on CPU."""
        return max(1, self.gpus)

    @classmethod
    def from_dict(cls, settings: dict[str, Any] | None) -> Parallel:
        known = {f.name for f in fields(cls)}
        unknown = set(settings or {}) - known
        if unknown:
            raise ParallelError(f"unknown parallel settings: {', '.join(sorted(unknown))}")
        return cls(**(settings or {}))

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def run_parallel(config: dict[str, Any], run: dict[str, Any]) -> Parallel:
    """A run's :class:`Parallel`: the config's ``parallel``, the run's ``gpus``, the run's
    ``parallel``, each laid over the one before."""
    settings = dict(config.get("parallel") or {})
    if "gpus" in run:
        settings["gpus_per_node"] = run["gpus"]
    settings |= run.get("parallel") or {}
    parallel = Parallel.from_dict(settings)
    if parallel.nodes > 1 and parallel.gpus_per_node < 1:
        raise ParallelError(f"parallel.nodes={parallel.nodes} needs gpus_per_node >= 1")
    return parallel


def launch_command(python: str, parallel: Parallel, port: int = RDZV_PORT) -> str:
    """The command line that runs ``<this> -m refrag.cli …`` on every process of the job."""
    g = parallel.gpus_per_node
    if parallel.nodes == 1 and g <= 1:
        return python
    torchrun = f"{python} -m torch.distributed.run"
    if parallel.nodes == 1:
        return f"{torchrun} --standalone --nproc_per_node={g}"
    if parallel.multinode == "aws-batch":  # the rule submits a multi-node parallel job, waits
        return (
            f"{python} -m refrag.cli batch-multinode --nodes={parallel.nodes} "
            f"--gpus-per-node={g} -- {shlex.quote(node_command(python, parallel, port))}"
        )
    # Slurm: the jobstep strips SLURM_* from the rule's environment but the job id, so the
    # head node is computed inside the srun-launched task (one per node)
    agent = (
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1); '
        f"exec {torchrun} --nnodes=$SLURM_NNODES --nproc-per-node={g} "
        f"--rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d --rdzv-endpoint=$head:{port} "
        '"$@"'
    )
    return (
        f"srun --nodes={parallel.nodes} --ntasks-per-node=1 --gpus-per-node={g} "
        f"bash -c {shlex.quote(agent)} torchrun"
    )


def node_command(python: str, parallel: Parallel, port: int = RDZV_PORT) -> str:
    """What each node of an AWS Batch multi-node parallel job runs before ``-m refrag.cli
    …``: one torchrun agent, the rendezvous at the main node (whose own address variable
    Batch leaves unset: ``hostname -i`` there)."""
    head = "${AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS:-$(hostname -i)}"
    return (
        f"{python} -m torch.distributed.run --nnodes=$AWS_BATCH_JOB_NUM_NODES "
        f"--nproc-per-node={parallel.gpus_per_node} --rdzv-id=$AWS_BATCH_JOB_ID "
        f"--rdzv-backend=c10d --rdzv-endpoint={head}:{port}"
    )
