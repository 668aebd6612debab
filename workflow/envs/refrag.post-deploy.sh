#!/usr/bin/env bash
# Runs once in the new conda environment, from the workflow's working directory (the
# project root): refrag and its pinned stack, exactly as ./setup.sh installs them into .venv.
set -euo pipefail
python -m pip install --disable-pip-version-check -q -c requirements.lock -e .
