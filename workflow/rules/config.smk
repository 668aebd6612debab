# The project's environment and the config, checked first: one line and exit outside the
# project's environment; every config problem in one line each (refrag.preflight), then the
# schema's defaults filled in.
import importlib.metadata
import sys
import tempfile
from pathlib import Path

import yaml
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

from refrag.preflight import check_config  # noqa: E402  (after the guard)
from refrag.train.stages import with_stage_schemas  # noqa: E402


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
