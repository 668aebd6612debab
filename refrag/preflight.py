"""The whole experiment config checked before the first job runs, one line per problem.

Before it is read at all, :func:`check_config_files` parses each config file (``--configfile``
and ``config/config.yaml``) and names a syntax error as ``file:line:column: message``
(:class:`ConfigFileError`), which Snakemake's own message does not.

:func:`check_config` returns every error it finds (an empty list when the config is good):

- the JSON schema (unknown keys anywhere, types, ranges), one line per error naming the key;
- numbers that YAML 1.1 reads as strings (``1e-3``: PyYAML wants a dot, ``1.0e-3``) are
  converted in place to the number the schema asks for, so they validate and reach the rules
  as numbers;
- every run names models of ``models``, and every model spec resolves (a known embedded name,
  an ``hf:<repo>`` of the right shape, or a local folder holding ``config.json``) without
  fetching or deleting anything;
- every k fits the encoder: a chunk row is ``k`` tokens plus CLS and SEP, so
  ``k + 2 <= max_position_embeddings`` (less the padding offset of RoBERTa-like encoders);
- the ``parallel`` settings of every run hold together (fsdp needs GPUs: on CPU the Trainer
  would silently run DDP), and on GPUs every stage the run trains fits the card: the
  estimated peak per GPU (:mod:`refrag.train.memory`) against ``parallel.gpu_memory_gib``,
  refused in one line naming the stage, the estimate and the fix. Shapes come from the
  fetched ``config.json``, a local folder's, or a table of known hub models; a model whose
  shapes are unknown before fetching is not estimated;
- a local corpus folder exists, holds documents, and at least one of them is long enough for a
  window (``min_chars``, and at least ``context_tokens + target_tokens`` UTF-8 bytes: no
  byte-level tokenizer makes more tokens than bytes).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from refrag.data.corpus import EMBEDDED_CORPORA, read_documents, shard_files, stream_documents
from refrag.io.models import (
    EMBEDDED_MODELS,
    ModelSpecError,
    cache_name,
    check_spec,
    split_layers_spec,
)
from refrag.modeling.limits import compression_limit
from refrag.train.launch import Parallel, run_parallel
from refrag.train.memory import (
    KNOWN_CONFIGS,
    Shapes,
    check_memory,
    estimate_peak,
    projector_params,
    stage_workload,
)
from refrag.train.stages import STAGES, stages_to_train

CORPUS_SUFFIXES = (".txt", ".parquet", ".jsonl")


class ConfigFileError(ValueError):
    """A config file that does not parse: ``file:line:column: message``, one line."""


def config_file_error(path: str | os.PathLike) -> str | None:
    """``file:line:column: message`` when ``path`` is neither JSON nor YAML (or unreadable), else
    ``None``. Line and column are 1-based, from the YAML error's ``problem_mark``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return f"{path}: no such config file"
    except (OSError, UnicodeDecodeError) as err:
        return f"{path}: unreadable ({type(err).__name__}: {err})"
    try:
        yaml.safe_load(text)  # YAML is a superset of the JSON Snakemake also accepts
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f"{path}"
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
        context = getattr(err, "context", None)
        detail = f"{problem} ({context})" if context else problem
        return f"{where}: {detail}"
    return None


def check_config_files(paths) -> None:
    """Raise :class:`ConfigFileError` naming the first config file that does not parse."""
    for path in paths:
        if (error := config_file_error(path)) is not None:
            raise ConfigFileError(error)


def configfile_args(argv: list[str]) -> list[str]:
    """The files given to ``--configfile``/``--configfiles`` on a Snakemake command line."""
    files, taking = [], False
    for arg in argv[1:]:
        if arg in ("--configfile", "--configfiles"):
            taking = True
        elif arg.startswith(("--configfile=", "--configfiles=")):
            files.append(arg.split("=", 1)[1])
            taking = False
        elif taking and not arg.startswith("-"):
            files.append(arg)
        else:
            taking = False
    return files


def load_schema(path: str | os.PathLike) -> dict:
    return yaml.safe_load(Path(path).read_text())


def check_config(
    config: dict,
    schema: dict | str | os.PathLike,
    cache_dir: str | os.PathLike = "resources/models",
) -> list[str]:
    """Every problem of ``config`` (coerced in place, see the module doc), one line each."""
    if not isinstance(schema, dict):
        schema = load_schema(schema)
    coerce_numbers(config, schema, schema)
    errors = schema_errors(config, schema)
    # each further check reads keys whose shape the schema guarantees: it runs only when the
    # schema found nothing wrong under them (one error is enough to name a key)
    invalid = {
        next(iter(error.absolute_path), None)
        for error in Draft202012Validator(schema).iter_errors(config)
    }
    checks = (
        (("models", "runs"), lambda: model_errors(config, Path(cache_dir))),
        (("corpus", "data"), lambda: corpus_errors(config)),
        (("eval", "runs"), lambda: eval_k_errors(config)),
        (
            ("models", "runs", "parallel", "train", "data", "eval"),
            lambda: memory_errors(config, Path(cache_dir)),
        ),
    )
    for keys, check in checks:
        if None not in invalid and not invalid & set(keys):
            errors += check()
    return errors


# -- schema ----------------------------------------------------------------------------------
def _resolve(node: dict, root: dict) -> dict:
    while isinstance(node, dict) and "$ref" in node:
        node = root["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node


def coerce_numbers(value: Any, node: dict, root: dict) -> Any:
    """Convert, in place, strings where the schema wants a number (``"1e-3"`` → ``0.001``)."""
    node = _resolve(node, root)
    if not isinstance(node, dict):
        return value
    if isinstance(value, dict):
        props = node.get("properties", {})
        extra = node.get("additionalProperties")
        for key in list(value):
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                value[key] = coerce_numbers(value[key], sub, root)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        value[:] = [coerce_numbers(v, node["items"], root) for v in value]
    elif isinstance(value, str) and node.get("type") in ("number", "integer"):
        try:
            number = float(value.strip())
        except ValueError:
            return value
        if node["type"] == "integer":
            return int(number) if number.is_integer() else value
        return number
    return value


def schema_errors(config: dict, schema: dict) -> list[str]:
    """One line per schema error, naming the key (``runs[0].train.cpt.lr``)."""
    lines = []
    errors = Draft202012Validator(schema).iter_errors(config)
    for error in sorted(errors, key=lambda e: [str(p) for p in e.absolute_path]):
        where = key_path(error.absolute_path)
        if error.validator == "additionalProperties":
            allowed = sorted(_resolve(error.schema, schema).get("properties", {}))
            for key in sorted(set(error.instance) - set(allowed)):
                lines.append(
                    f"config {key_path([*error.absolute_path, key])}: unknown key"
                    + (f" (known here: {', '.join(allowed)})" if allowed else "")
                )
        elif error.validator == "type" and isinstance(error.instance, str):
            lines.append(f"config {where}: {error.instance!r} is not a {error.validator_value}")
        else:
            lines.append(f"config {where or '(top level)'}: {error.message}")
    return lines


def key_path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# -- models and k ----------------------------------------------------------------------------
def model_errors(config: dict, cache_dir: Path) -> list[str]:
    errors = []
    models = config["models"]
    for name, spec in models.items():
        try:
            check_spec(spec)
        except ModelSpecError as err:
            errors.append(f"config models.{name}: {err}")
    for i, run in enumerate(config["runs"]):
        for role in ("decoder", "encoder"):
            if run[role] not in models:
                errors.append(
                    f"config runs[{i}].{role}: {run[role]!r} is not a key of `models` "
                    f"({', '.join(models)})"
                )
        if run["encoder"] not in models:
            continue
        limit = chunk_limit(models[run["encoder"]], cache_dir / cache_name(models[run["encoder"]]))
        for j, k in enumerate(run["k"]):
            if limit is not None and k > limit:
                errors.append(
                    f"config runs[{i}].k[{j}]: k={k} does not fit encoder "
                    f"{run['encoder']!r}: a chunk row is k + 2 tokens (CLS, SEP) and it has "
                    f"positions for {limit + 2}; use k <= {limit}"
                )
    return errors


def chunk_limit(spec: str, fetched: Path | None = None) -> int | None:
    """The largest k whose chunk rows fit the encoder's positions, or ``None`` if unknown
    without fetching (an ``hf:`` model not downloaded yet)."""
    config_file = None
    if fetched is not None and (fetched / "config.json").is_file():
        config_file = fetched / "config.json"
    elif spec.startswith("layers:"):  # a decoder's lower layers: its positions
        try:
            return chunk_limit(split_layers_spec(spec)[1])
        except ModelSpecError:
            return None  # named by the spec check
    elif not spec.startswith(("hf:", "embedded:")) and (Path(spec) / "config.json").is_file():
        config_file = Path(spec) / "config.json"
    if config_file is not None:
        return compression_limit(json.loads(config_file.read_text()))
    name = spec.removeprefix("embedded:")
    if spec.startswith("embedded:") and EMBEDDED_MODELS.get(name) is not None:
        positions = EMBEDDED_MODELS[name].max_positions
        return None if positions is None else positions - 2
    return None


def eval_k_errors(config: dict) -> list[str]:
    """``eval.selective.k`` and ``eval.qa.k`` name k values that some run trains."""
    trained = {k for run in config["runs"] for k in run["k"]}
    errors = []
    for part in ("selective", "qa"):
        for j, k in enumerate(config.get("eval", {}).get(part, {}).get("k", [])):
            if k not in trained:
                errors.append(
                    f"config eval.{part}.k[{j}]: no run trains k={k} "
                    f"(runs' k: {', '.join(map(str, sorted(trained)))})"
                )
    return errors


# -- parallel settings and memory --------------------------------------------------------------
def memory_errors(config: dict, cache_dir: Path) -> list[str]:
    """Each run's parallel block, then each GPU stage's estimated peak against the card."""
    errors = []
    for i, run in enumerate(config["runs"]):
        try:
            parallel = run_parallel(config, run)
        except (TypeError, ValueError) as err:
            errors.append(f"config runs[{i}]: {err}")
            continue
        if parallel.strategy == "fsdp" and parallel.gpus == 0:
            errors.append(
                f"config runs[{i}]: strategy fsdp needs GPUs (parallel.gpus_per_node >= 1); "
                "on CPU the Trainer would run DDP instead"
            )
        if parallel.gpus == 0 or run["decoder"] not in config["models"]:
            continue
        if run["encoder"] not in config["models"]:
            continue
        errors += run_memory_errors(config, run, parallel, cache_dir, f"runs[{i}] ")
    return errors


def run_memory_errors(
    config: dict, run: dict, parallel: Parallel, cache_dir: Path, where: str = ""
) -> list[str]:
    """One refusal per stage and k of ``run`` whose estimated peak exceeds the card."""
    shapes = {
        role: model_shapes(config["models"][run[role]], cache_dir, causal=role == "decoder")
        for role in ("encoder", "decoder")
    }
    if None in shapes.values():
        return []  # not fetched yet and not a known hub model: nothing to estimate from
    encoder, decoder = shapes["encoder"], shapes["decoder"]
    data = config.get("data", {})
    context, target = data.get("context_tokens", 256), data.get("target_tokens", 64)
    errors = []
    for k in run["k"]:
        for stage in stages_to_train(config.get("eval", {}), k):
            overrides = config.get("train", {}).get(stage, {}) | run.get("train", {}).get(stage, {})
            hp = STAGES[stage].defaults.merged(overrides)
            work = stage_workload(stage, hp, k, context, target)

            def estimate_for(p: Parallel, stage=stage, hp=hp, work=work):
                return estimate_peak(
                    stage,
                    hp,
                    work,
                    encoder=encoder,
                    decoder=decoder,
                    projector=projector_params(encoder, decoder),
                    parallel=p,
                )

            refusal = check_memory(estimate_for, parallel, f"k{k}/{stage}")
            if refusal:
                errors.append(f"config {where}{refusal}")
    return errors


def model_shapes(spec: str, cache_dir: Path, causal: bool) -> Shapes | None:
    """The shapes of a model spec without fetching it: its fetched or local ``config.json``,
    else :data:`refrag.train.memory.KNOWN_CONFIGS`; ``None`` when neither knows it."""
    candidates = [cache_dir / cache_name(spec) / "config.json"]
    if not spec.startswith(("hf:", "embedded:")):
        candidates.append(Path(spec) / "config.json")
    for path in candidates:
        if path.is_file():
            return Shapes.of(json.loads(path.read_text()), causal=causal)
    repo = spec.removeprefix("hf:").partition("@")[0]
    if spec.startswith("hf:") and repo in KNOWN_CONFIGS:
        return Shapes.of(KNOWN_CONFIGS[repo], causal=causal)
    return None


# -- corpus ----------------------------------------------------------------------------------
def corpus_errors(config: dict) -> list[str]:
    corpus = config["corpus"]
    source = corpus["source"]
    if corpus.get("streamed"):
        if source.startswith("embedded:"):
            return [
                f"config corpus.streamed: needs a folder of shard files or hf:<dataset>, not "
                f"{source!r}"
            ]
        if source.startswith("hf:") and not corpus.get("shards"):
            return [
                f"config corpus.shards: streaming {source!r} needs the number of part jobs "
                "(each streams every shards-th data file)"
            ]
        if "train" in config.get("eval", {}).get("sets", []):
            return [
                "config eval.sets: a streamed corpus keeps no train split to evaluate on "
                "(its train windows are tokenized shard by shard)"
            ]
    if source.startswith("embedded:"):
        name = source.removeprefix("embedded:")
        if name in EMBEDDED_CORPORA:
            return []
        known = ", ".join("embedded:" + n for n in EMBEDDED_CORPORA)
        return [f"config corpus.source: unknown embedded corpus {name!r} (known: {known})"]
    if source.startswith("hf:"):
        if re.fullmatch(r"[\w.-]+(/[\w.-]+)?(@[\w./-]+)?", source.removeprefix("hf:")):
            return []
        return [f"config corpus.source: {source!r} is not hf:<dataset>[@revision]"]
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return [
            f"config corpus.source: {source!r} is not a folder (nor embedded:<name>, hf:<dataset>)"
        ]
    data = config.get("data", {})
    window = data.get("context_tokens", 256) + data.get("target_tokens", 64)
    min_chars = corpus.get("min_chars", 2000)
    if corpus.get("streamed"):  # read one shard, streamed, never the whole folder
        shards = shard_files(folder)
        if not shards:
            return [
                f"config corpus.source: streamed folder {source!r} holds no .parquet, .jsonl "
                "or .jsonl.zst shard"
            ]
        texts = (d["text"] for d in stream_documents(shards[0], corpus.get("subsets", [])))
    else:
        files = [p for p in folder.rglob("*") if p.suffix in CORPUS_SUFFIXES and p.is_file()]
        if not files:
            return [
                f"config corpus.source: folder {source!r} holds no .txt, .parquet or .jsonl file"
            ]
        texts = _texts(folder)
    for text in texts:
        if len(text) >= min_chars and len(text.encode("utf-8", "replace")) >= window:
            return []
    return [
        f"config corpus.source: no document in {source!r} is long enough: documents need "
        f"corpus.min_chars={min_chars} characters and room for a window of data.context_tokens "
        f"+ data.target_tokens = {window} tokens"
    ]


def _texts(folder: Path) -> Iterator[str]:
    try:
        for doc in read_documents(str(folder)):
            if isinstance(doc.get("text"), str):
                yield doc["text"]
    except (OSError, ValueError, KeyError, UnicodeDecodeError):
        return
