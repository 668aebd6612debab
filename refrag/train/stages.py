"""The training stages, in one table: :data:`STAGES`.

A :class:`Stage` names what a stage reads (``data``), the stage whose checkpoint it starts
from (``previous``; ``None``: the base encoder and decoder), how its examples are built
(``dataset``), which trainer optimizes them (``trainer``) and its default hyperparameters
(``defaults``, a :class:`StageConfig`). Everything else reads this table: ``train_stage`` and
``python -m refrag.cli train --stage NAME``, the workflow's one ``train`` rule and its config
schema (:func:`stage_config_schema`), and the report. Adding a stage is one entry here, plus
its dataset builder and trainer (:mod:`refrag.train.datasets`, :mod:`refrag.train.trainers`).

To add a stage:

1. write its dataset builder ``(data, tok, hp) -> (dataset, collator)`` and trainer factory
   ``(hp, **trainer_kwargs) -> Trainer`` in :mod:`refrag.train.trainers` (or reuse existing ones);
   new hyperparameters become :class:`StageConfig` fields (with a description and JSON-schema
   constraints: the config schema is generated from them);
2. add its :class:`Stage` below, after the stage named in ``previous`` (table order is
   training order);
3. only if it reads a new kind of ``data``: add the kind to ``Stage.data`` and its path to
   ``STAGE_DATA`` in ``workflow/rules/common.smk``.

The workflow then has a ``train`` job for it and a ``train.NAME`` config section with its
defaults; list it in the config's ``eval.stages`` to evaluate its checkpoints.

``dataset`` and ``trainer`` are ``"module:attribute"`` references, resolved by
:meth:`Stage.build_dataset` / :meth:`Stage.build_trainer`, so that the workflow can read the
table when it parses the Snakefile without importing the Trainer stack.
"""

from __future__ import annotations

import importlib
import os
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal


def _hp(default: Any, description: str, **schema: Any) -> Any:
    """A :class:`StageConfig` field: its default, description and JSON-schema constraints."""
    factory = {"default_factory": lambda: type(default)(default)}
    kind = factory if isinstance(default, list | dict) else {"default": default}
    return field(**kind, metadata={"description": description, **schema})


@dataclass
class StageConfig:
    """Hyperparameters of one training stage (a rule's ``params``; the config's ``train.NAME``)."""

    steps: int = _hp(100, "optimizer steps", minimum=1)
    batch_size: int = _hp(8, "per-device batch size", minimum=1)
    lr: float = _hp(1e-4, "peak learning rate (AdamW, cosine, warmup)", exclusiveMinimum=0)
    warmup_ratio: float = _hp(0.04, "fraction of the steps spent warming up", minimum=0, maximum=1)
    weight_decay: float = _hp(0.0, "AdamW weight decay", minimum=0)
    grad_accum: int = _hp(1, "gradient-accumulation steps", minimum=1)
    train_encoder: bool = _hp(True, "update the encoder's weights")
    train_projector: bool = _hp(True, "update the projector's weights")
    train_decoder: bool = _hp(False, "update the decoder's weights")
    curriculum: list[int] = _hp(
        [1, 2, 4, 8, 16],
        "chunks per example at each curriculum stage (reconstruction)",
        items={"minimum": 1},
        minItems=1,
    )
    target_tokens: int = _hp(
        0,
        "target tokens per window trained on, the first ones (continuation stages; 0: all o); "
        "evaluation always scores all o",
        minimum=0,
    )
    loss_weights: dict[str, float] = _hp(
        {"mse": 1.0, "kld": 1.0, "argmax": 1.0},
        "weights of the alignment losses",
        properties={name: {"type": "number", "minimum": 0} for name in ("mse", "kld", "argmax")},
        additionalProperties=False,
    )
    max_pairs: int = _hp(
        256,
        "aligned positions per alignment batch (each costs a vocabulary-wide softmax)",
        minimum=1,
    )
    eval_steps: int = _hp(
        0,
        "steps between held-out log-perplexity points (the stage's curve; 0: none)",
        minimum=0,
    )
    max_expand_fraction: float = _hp(
        0.5,
        "mixed inputs: each example expands a random fraction p ~ U[0, this] of its chunks "
        "to tokens (the mixed stage)",
        minimum=0,
        maximum=1,
    )
    expand_fraction: float = _hp(
        0.25,
        "fraction p of a context's chunks the policy expands to tokens (the policy stage)",
        minimum=0,
        maximum=1,
    )
    policy_samples: int = _hp(
        4,
        "selections drawn per window for REINFORCE's leave-one-out baseline (the policy stage)",
        minimum=2,
    )
    data: str = _hp(
        "",
        "what the stage reads instead of the workflow's default (the sft stage: a "
        ".jsonl/.json/.parquet file of questions and answers, or hf:<dataset>[@revision]); "
        "empty: the default",
    )
    save_steps: int = _hp(50, "steps between Trainer checkpoints (resume points)", minimum=1)
    logging_steps: int = _hp(5, "steps between logged losses", minimum=1)
    seed: int = _hp(0, "seed of torch, the Trainer and the alignment-pair sampling")

    def merged(self, overrides: dict[str, Any] | None) -> StageConfig:
        """This configuration with ``overrides`` laid over it (unknown names raise TypeError)."""
        return replace(self, **(overrides or {}))


@dataclass(frozen=True)
class Stage:
    """One training stage: see the module docstring."""

    name: str
    summary: str
    data: Literal["alignment", "shards"]  # the alignment-pair cache, or the train shard folder
    previous: str | None
    dataset: str  # "module:function" (data, tok, hp) -> (torch Dataset, collator)
    trainer: str  # "module:function" (hp, **trainer_kwargs) -> transformers.Trainer
    defaults: StageConfig
    ablation: bool = False  # a variant of another stage, reported beside it, never built on
    # the evaluation that reads this stage's checkpoints besides perplexity: "qa" (answers
    # with and without this stage: it and the stage it starts from), "selective" (its policy)
    role: Literal["qa", "selective"] | None = None
    # why the stage trains with DDP even where the run's strategy is fsdp ("": it shards)
    unsharded: str = ""

    def build_dataset(self, data: str | os.PathLike, tok: Any, hp: StageConfig) -> tuple:
        return _resolve(self.dataset)(data, tok, hp)

    def build_trainer(self, hp: StageConfig, **trainer_kwargs: Any) -> Any:
        return _resolve(self.trainer)(hp, **trainer_kwargs)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            name="align",
            summary="the seed's alignment app, read the way the model reads context: a span of "
            "encoder tokens that is one decoder token, encoded as a chunk (CLS state, "
            "projected), should become that token's embedding (MSE + KL + argmax losses)",
            data="alignment",
            previous=None,
            dataset="refrag.train.datasets:alignment_dataset",
            trainer="refrag.train.trainers:alignment_trainer",
            defaults=StageConfig(
                steps=10, batch_size=8, lr=1e-3, max_pairs=128, train_encoder=False
            ),
        ),
        Stage(
            name="reconstruct",
            summary="paper stage 1: decoder frozen; encoder + projector reproduce the context "
            "from its chunk embeddings, with a mixed-length curriculum from 1 chunk up to the "
            "whole context",
            data="shards",
            previous="align",
            dataset="refrag.train.datasets:reconstruction_dataset",
            trainer="refrag.train.trainers:curriculum_trainer",
            defaults=StageConfig(steps=20, batch_size=4, lr=2e-4, curriculum=[1, 2, 4, 8, 16, 32]),
        ),
        Stage(
            name="cpt",
            summary="paper stage 2 (continual pretraining): encoder, projector and decoder "
            "read s context tokens as chunk embeddings and predict the next o tokens",
            data="shards",
            previous="reconstruct",
            dataset="refrag.train.datasets:continuation_dataset",
            trainer="refrag.train.trainers:causal_lm_trainer",
            defaults=StageConfig(
                steps=60,
                batch_size=4,
                lr=1e-4,
                train_decoder=True,
                target_tokens=32,
                eval_steps=20,
            ),
        ),
        Stage(
            name="cpt_frozen",
            summary="ablation of cpt with the decoder frozen (encoder and projector train)",
            data="shards",
            previous="reconstruct",
            dataset="refrag.train.datasets:continuation_dataset",
            trainer="refrag.train.trainers:causal_lm_trainer",
            defaults=StageConfig(steps=60, batch_size=4, lr=2e-4, target_tokens=32, eval_steps=20),
            ablation=True,
        ),
        Stage(
            name="sft",
            summary="paper stage 3 (SFT, TRL's SFTTrainer): answer questions about passages "
            "read as chunk embeddings in <doc> tags, in the decoder's chat template; loss on "
            "the answer only",
            data="shards",  # cloze questions of the train windows (or a file: refrag.train.sft)
            previous="cpt",
            dataset="refrag.train.sft:sft_dataset",
            trainer="refrag.train.sft:sft_trainer",
            defaults=StageConfig(steps=10, batch_size=2, lr=5e-5, train_decoder=True),
            role="qa",
        ),
        Stage(
            name="mixed",
            summary="selective compression, first part (the paper trains with random p first): "
            "continual pretraining on mixed inputs, a random fraction p of each context's "
            "chunks read as tokens and the rest as chunk embeddings",
            data="shards",
            previous="cpt",
            dataset="refrag.train.selective:mixed_dataset",
            trainer="refrag.train.trainers:causal_lm_trainer",
            defaults=StageConfig(
                steps=15, batch_size=4, lr=5e-5, train_decoder=True, target_tokens=32
            ),
        ),
        Stage(
            name="policy",
            summary="selective compression, second part: a small policy network over the chunk "
            "embeddings learns by REINFORCE (reward: minus the continuation's log-ppl) which "
            "fraction p of the chunks to expand; the mixed-input model stays frozen",
            data="shards",
            previous="mixed",
            dataset="refrag.train.selective:policy_dataset",
            trainer="refrag.train.selective:policy_trainer",
            defaults=StageConfig(
                steps=20,
                batch_size=4,
                lr=1e-3,
                train_encoder=False,
                train_projector=False,
                logging_steps=2,
            ),
            role="selective",
            unsharded="it trains only the small chunk policy (DDP); the frozen REFRAG model it "
            "scores with is kept whole in each process",
        ),
    )
}


def final_stage(names: list[str]) -> str:
    """The stage whose checkpoints are *the* REFRAG model among ``names``: the last one in
    training order that is not an ablation."""
    main = [name for name in STAGES if name in names and not STAGES[name].ablation]
    if not main:
        raise ValueError(f"no stage among {names} is a main (non-ablation) stage")
    return main[-1]


def stage_with_role(role: str) -> str:
    """The one stage whose checkpoints the ``role`` evaluation reads (``qa``, ``selective``)."""
    names = [name for name, stage in STAGES.items() if stage.role == role]
    if len(names) != 1:
        raise ValueError(f"{len(names)} stages have the role {role!r}; the registry needs one")
    return names[0]


def qa_stages() -> list[str]:
    """The stages QA evaluates: the QA stage's starting point (no fine-tuning) and itself."""
    qa = stage_with_role("qa")
    return [STAGES[qa].previous, qa]


def stages_to_train(eval_config: dict[str, Any], k: int) -> list[str]:
    """The stages a run trains at ``k``, in registry order: those ``eval.stages`` lists, the
    selective stage where ``eval.selective.k`` lists k, the QA stages where ``eval.qa.k`` does,
    and the stages they start from (what the workflow's ``stages_at`` builds)."""
    wanted = list(eval_config.get("stages", ["reconstruct", "cpt"]))
    if k in eval_config.get("selective", {}).get("k", []):
        wanted.append(stage_with_role("selective"))
    if k in eval_config.get("qa", {}).get("k", []):
        wanted += qa_stages()
    needed = set()
    for name in wanted:
        while name is not None:
            needed.add(name)
            name = STAGES[name].previous
    return [name for name in STAGES if name in needed]


def get_stage(name: str) -> Stage:
    """The registered stage ``name``; a ValueError naming the known stages otherwise."""
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None


def stage_config_schema(defaults: StageConfig | None = None) -> dict[str, Any]:
    """JSON schema (draft 2020-12) of a stage's hyperparameters, from :class:`StageConfig`'s
    fields; with ``defaults``, each property carries its default value."""
    hints = typing.get_type_hints(StageConfig)
    properties = {}
    for f in fields(StageConfig):
        prop = _json_type(hints[f.name])
        for key, value in f.metadata.items():  # constraints refine the generated type
            both = isinstance(prop.get(key), dict) and isinstance(value, dict)
            prop[key] = prop[key] | value if both else value
        if defaults is not None:
            prop["default"] = asdict(defaults)[f.name]
        properties[f.name] = prop
    return {
        "type": "object",
        "description": "hyperparameters of one training stage (refrag.train.stages.StageConfig)",
        "properties": properties,
        "additionalProperties": False,
    }


def with_stage_schemas(schema: dict[str, Any]) -> dict[str, Any]:
    """The workflow's config ``schema`` (a dict, changed in place and returned) with its stage
    sections filled from :data:`STAGES`: ``train.NAME`` (with defaults, but for ``seed``,
    which comes from the config's top-level ``seed``), each run's
    ``train.NAME`` overrides, and the stage names ``eval.stages`` may list."""
    props = schema["properties"]
    props["train"]["properties"] = {
        name: _without_seed_default(stage_config_schema(stage.defaults)) | {"default": {}}
        for name, stage in STAGES.items()
    }
    props["runs"]["items"]["properties"]["train"]["properties"] = {
        name: stage_config_schema() for name in STAGES
    }
    props["eval"]["properties"]["stages"]["items"] = {"enum": list(STAGES)}
    return schema


def _without_seed_default(schema: dict[str, Any]) -> dict[str, Any]:
    """A stage's seed defaults to the config's top-level ``seed``, not to 0."""
    schema["properties"]["seed"].pop("default")
    return schema


def _json_type(hint: Any) -> dict[str, Any]:
    scalar = {int: "integer", float: "number", bool: "boolean", str: "string"}
    if hint in scalar:
        return {"type": scalar[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return {"type": "array", "items": _json_type(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _json_type(args[1])}
    raise TypeError(f"no JSON type for {hint!r}")


def _resolve(reference: str) -> Any:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)
