#!/usr/bin/env bash
# CI services for the profile tests: podman (standing in for the Docker client, see
# tests/test_profile_docker.py) and its runtime. Installs only; starts nothing persistent
# (the moto server of tests/test_profile_aws_batch.py is started and stopped by the test).
set -euo pipefail
if command -v podman >/dev/null && command -v runc >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo ".ci/services.sh: not root with apt-get: podman tests will be skipped" >&2
    exit 0
fi
echo "==> installing podman, runc, uidmap (apt)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    podman runc uidmap >/dev/null
