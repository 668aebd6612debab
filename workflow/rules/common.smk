import importlib.metadata
import json
import os
import sys
from pathlib import Path

import yaml

from snakemake.utils import validate


# --- the environment guard: stop early, in one line, outside the project's environment ---
def _check_environment():
    try:
        import refrag  # noqa: F401

        for dist, pinned in (("torch", "2.13.0"), ("transformers", "5.24.0")):
            found = importlib.metadata.version(dist)
            if not found.startswith(pinned):
                raise ImportError(f"{dist} {found} != {pinned}")
    except ImportError as err:
        sys.exit(
            f"refrag-workflow: not in the project's environment ({err}); "
            "run ./setup.sh and `source .venv/bin/activate` (or use .venv/bin/snakemake)."
        )


_check_environment()
validate(config, "../schemas/config.schema.yaml")
for _i, _run in enumerate(config["runs"]):
    for _role in ("decoder", "encoder"):
        if _run[_role] not in config["models"]:
            raise ValueError(
                f"config runs[{_i}].{_role}: {_run[_role]!r} is not a key of `models` "
                f"({', '.join(config['models'])})"
            )


# --- config accessors ---
def model_spec(model):
    return config["models"][model]


SPLITS = ["train", "validation", "test"]
CORPUS = config["corpus"]["name"]


def fetched_corpus(wildcards):
    """Embedded and hf: corpora are fetched first; a local folder is read in place."""
    if config["corpus"]["source"].startswith(("embedded:", "hf:")):
        return f"resources/corpus/{wildcards.corpus}/source"
    return []


STAGES = ["align", "reconstruct", "cpt"]


wildcard_constraints:
    k=r"\d+",
    split="|".join(SPLITS),
    stage="|".join(STAGES),


def find_run(wildcards):
    """The config run that a job's decoder/encoder/k wildcards belong to."""
    for run in config["runs"]:
        if (run["decoder"], run["encoder"]) == (
            wildcards.decoder,
            wildcards.encoder,
        ) and int(wildcards.k) in run["k"]:
            return run
    raise ValueError(
        f"no run in the config has decoder={wildcards.decoder}, encoder={wildcards.encoder}, k={wildcards.k}"
    )


def stage_hp(wildcards, stage):
    """A stage's hyperparameters: the config's defaults, overridden by the run's own."""
    return config["train"][stage] | find_run(wildcards).get("train", {}).get(stage, {})


def run_gpus(wildcards):
    return find_run(wildcards).get("gpus", 0)


PYTHON = sys.executable  # the environment Snakemake runs in, whatever PATH says


def launcher(wildcards, resources):
    """torchrun with one process per GPU; on CPU (or one GPU) the script runs inline."""
    if resources.gpu > 1:
        return f"{PYTHON} -m torch.distributed.run --standalone --nproc_per_node={resources.gpu}"
    return PYTHON


def run_keys():
    """(decoder, encoder, k) of every configured run."""
    return [(r["decoder"], r["encoder"], k) for r in config["runs"] for k in r["k"]]


def pair_keys():
    return sorted({(d, e) for d, e, _ in run_keys()})


def eval_outputs():
    """Every evaluation JSON the perplexity table is made of."""
    files = []
    for eval_set in config["eval"]["sets"]:
        for decoder, encoder in pair_keys():
            files.append(
                f"results/eval/{CORPUS}/{decoder}/{encoder}/{eval_set}/baselines.json"
            )
        for decoder, encoder, k in run_keys():
            for stage in config["eval"]["stages"]:
                files.append(
                    f"results/eval/{CORPUS}/{decoder}/{encoder}/{eval_set}/k{k}-{stage}.json"
                )
    return files


def checkpoints(stage):
    return [f"results/checkpoints/{d}/{e}/k{k}/{stage}" for d, e, k in run_keys()]


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
