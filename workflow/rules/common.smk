import importlib.metadata
import json
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


# --- the environment guard: stop early, in one line, outside the project's environment ---
def _check_environment():
    """refrag importable, and torch/transformers at the versions refrag's own metadata pins
    (pyproject.toml is the one place the pins live)."""
    try:
        import refrag  # noqa: F401

        pins = dict(
            r.split(" ")[0].split("==")
            for r in importlib.metadata.requires("refrag") or []
            if "==" in r and ";" not in r
        )
        for dist in ("torch", "transformers"):
            found = importlib.metadata.version(dist)
            if not found.startswith(pins[dist]):
                raise ImportError(f"{dist} {found} != {pins[dist]}")
    except (ImportError, KeyError) as err:
        sys.exit(
            f"refrag-workflow: not in the project's environment ({err}); "
            "run ./setup.sh and `source .venv/bin/activate` (or use .venv/bin/snakemake)."
        )


_check_environment()

from refrag.train.stages import (
    STAGES,
    final_stage,
    with_stage_schemas,
)  # noqa: E402  (after the guard)


def config_schema():
    """workflow/schemas/config.schema.yaml, whose stage sections (names, hyperparameters and
    their defaults) come from the stage registry refrag.train.stages.STAGES."""
    schema = yaml.safe_load(
        Path(workflow.basedir, "workflow/schemas/config.schema.yaml").read_text()
    )
    return with_stage_schemas(schema)


def validate_config(config):
    """The whole config, before any job: one line per problem (refrag.preflight), then the
    schema's defaults filled in."""
    from refrag.preflight import check_config

    schema = config_schema()
    errors = check_config(config, schema)
    if errors:
        sys.exit(
            "refrag-workflow: config errors, nothing was run:\n  " + "\n  ".join(errors)
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "config.schema.yaml")
        path.write_text(yaml.safe_dump(schema))
        validate(config, str(path))


validate_config(config)


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


wildcard_constraints:
    corpus=re.escape(CORPUS),  # the corpus rules make the configured corpus only
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


def stage_hp(wildcards):
    """The job's stage hyperparameters: the config's (whose defaults come from the stage
    registry; the seed from the top-level `seed`), overridden by the run's own."""
    stage = wildcards.stage
    own = find_run(wildcards).get("train", {}).get(stage, {})
    return {"seed": config["seed"]} | config["train"][stage] | own


# what each kind of `Stage.data` is in this workflow's layout
STAGE_DATA = {
    "alignment": "results/alignment/{corpus}/{decoder}/{encoder}/train.parquet",
    "shards": "results/shards/{corpus}/{decoder}/{encoder}/train",
}
INPUT_RULE = {
    "data": {"alignment": "align_pairs", "shards": "tokenize"},
    "init": "train",
}
CHECKPOINT = "results/checkpoints/{corpus}/{decoder}/{encoder}/k{k}/{stage}"
HELDOUT = "results/shards/{corpus}/{decoder}/{encoder}/validation"
HELDOUT_BASELINES = "results/heldout/{corpus}/{decoder}/{encoder}/baselines.json"
QA_SET = "results/qa/{corpus}/{decoder}/{encoder}/{eval_set}.jsonl"
QA_BASELINES = "results/eval/{corpus}/{decoder}/{encoder}/{eval_set}/qa/baselines.json"
QA_EVAL = "results/eval/{corpus}/{decoder}/{encoder}/{eval_set}/qa/k{k}-{stage}.json"


def train_inputs(wildcards):
    """A stage reads its data and starts from the previous stage's checkpoint (registry), or
    from the base encoder and decoder."""
    stage = STAGES[wildcards.stage]
    values = dict(wildcards.items())
    inputs = {"data": STAGE_DATA[stage.data].format(**values)}
    if stage.previous:
        inputs["init"] = CHECKPOINT.format(**values | {"stage": stage.previous})
    else:
        inputs["encoder"] = f"resources/models/{wildcards.encoder}"
        inputs["decoder"] = f"resources/models/{wildcards.decoder}"
    hp = stage_hp(wildcards)
    if hp["data"] and not hp["data"].startswith("hf:"):  # e.g. an SFT question file
        inputs["own_data"] = hp["data"]
    if hp["eval_steps"]:  # the stage logs its held-out curve
        inputs["heldout"] = HELDOUT.format(**values)
        inputs["heldout_baselines"] = HELDOUT_BASELINES.format(**values)
    return inputs


def train_start(wildcards, input):
    """`python -m refrag.train` arguments naming where the stage starts (and the held-out
    windows of its curve)."""
    heldout = ""
    if "heldout" in input.keys():
        heldout = (
            f" --heldout {shlex.quote(input.heldout)}"
            f" --heldout-baselines {shlex.quote(input.heldout_baselines)}"
        )
    if "init" in input.keys():
        return f"--init {shlex.quote(input.init)}{heldout}"
    return (
        f"--encoder {shlex.quote(input.encoder)} --decoder {shlex.quote(input.decoder)}"
        + heldout
    )


def train_rebuilt_by(wildcards, input):
    """JSON mapping each input path to the step that writes it (named by a damaged input's error)."""
    rules = {input.data: INPUT_RULE["data"][STAGES[wildcards.stage].data]}
    if "heldout" in input.keys():
        rules[input.heldout] = "tokenize"
        rules[input.heldout_baselines] = "heldout_baselines"
    for name in ("init", "encoder", "decoder"):
        if name in input.keys():
            rules[input[name]] = INPUT_RULE["init"] if name == "init" else "fetch_model"
    return shlex.quote(json.dumps(rules))


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


def selective_keys():
    """(decoder, encoder, k) of the runs evaluated with selective compression."""
    return [key for key in run_keys() if key[2] in config["eval"]["selective"]["k"]]


def qa_keys():
    """(decoder, encoder, k) of the runs evaluated on QA (and fine-tuned by the sft stage)."""
    return [key for key in run_keys() if key[2] in config["eval"]["qa"]["k"]]


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
        for decoder, encoder, k in selective_keys():
            files.append(
                f"results/eval/{CORPUS}/{decoder}/{encoder}/{eval_set}/k{k}-selective.json"
            )
    return files


def qa_outputs():
    """Every QA JSON the QA table is made of: the base decoder's baselines (without SFT),
    REFRAG after cpt (without SFT), and all three variants after sft."""
    files = []
    for eval_set in config["eval"]["sets"]:
        where = {"corpus": CORPUS, "eval_set": eval_set}
        for decoder, encoder in sorted({(d, e) for d, e, _ in qa_keys()}):
            files.append(QA_BASELINES.format(decoder=decoder, encoder=encoder, **where))
        for decoder, encoder, k in qa_keys():
            files += [
                QA_EVAL.format(
                    decoder=decoder, encoder=encoder, k=k, stage=stage, **where
                )
                for stage in ("cpt", "sft")
            ]
    return files


def stages_at(k):
    """The stages trained at k, in registry order: those eval.stages lists, the policy stage
    where eval.selective.k lists k, cpt and sft where eval.qa.k does, and the stages they
    start from."""
    wanted = list(config["eval"]["stages"])
    if k in config["eval"]["selective"]["k"]:
        wanted.append("policy")
    if k in config["eval"]["qa"]["k"]:
        wanted += ["cpt", "sft"]
    needed = set()
    for name in wanted:
        while name is not None:
            needed.add(name)
            name = STAGES[name].previous
    return [name for name in STAGES if name in needed]


def checkpoints():
    """Every run's checkpoint of each trained stage, in registry order."""
    return [
        CHECKPOINT.format(corpus=CORPUS, decoder=d, encoder=e, k=k, stage=stage)
        for d, e, k in run_keys()
        for stage in stages_at(k)
    ]


def checkpoint_labels():
    """The run label of each of checkpoints(), for the training-curve plot."""
    return [f"{d} / {e} / k{k}" for d, e, k in run_keys() for _ in stages_at(k)]


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
