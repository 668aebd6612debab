import importlib.metadata
import sys

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


# --- config accessors ---
def model_spec(model):
    return config["models"][model]


SPLITS = ["train", "validation", "test"]
CORPUS = config["corpus"]["name"]


def corpus_raw_input(wildcards):
    """An embedded corpus is fetched first; folders and hf: datasets are read in place."""
    if config["corpus"]["source"].startswith("embedded:"):
        return f"resources/corpus/{wildcards.corpus}/raw.xml.bz2"
    return []
