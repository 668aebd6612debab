# What each training stage's job reads, where it starts and how it is launched; which stages
# are trained at each k. The stage registry (refrag.train.stages.STAGES) is the only list of
# stage names: the stages that feed QA and selective evaluation are asked of it by role.
import json
import shlex


def stage_hp(wildcards):
    """The job's stage hyperparameters: the config's (whose defaults come from the stage
    registry; the seed from the top-level `seed`), overridden by the run's own."""
    stage = wildcards.stage
    own = find_run(wildcards).get("train", {}).get(stage, {})
    return {"seed": config["seed"]} | config["train"][stage] | own


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
    """`python -m refrag.cli train` arguments naming where the stage starts (and the held-out
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


def stages_at(k):
    """The stages trained at k, in registry order: those eval.stages lists, the selective
    stage where eval.selective.k lists k, the QA stages where eval.qa.k does, and the stages
    they start from."""
    wanted = list(config["eval"]["stages"])
    if k in config["eval"]["selective"]["k"]:
        wanted.append(SELECTIVE_STAGE)
    if k in config["eval"]["qa"]["k"]:
        wanted += qa_stages()
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
