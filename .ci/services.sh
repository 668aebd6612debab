#!/usr/bin/env bash
# CI services for the profile tests, on loopback only:
# - podman + runc (+ uidmap) stand in for the Docker client, and mmdebstrap makes the Debian
#   base from which tests/test_profile_docker.py builds ./Dockerfile (no registry is reachable);
#   installed only, nothing persistent is started;
# - a Slurm on this host (slurmctld, three slurmd: one node, and a two-node partition; munge; tests/test_profile_slurm.py): installed and
#   started by .ci/slurm.sh (munged, slurmctld, slurmd run as daemons; `bash .ci/slurm.sh stop`).
# - chromium: tests/test_report.py renders the report in a headless browser.
# The moto server of tests/test_profile_aws_batch.py is started and stopped by that test.
# Without root or apt-get it installs nothing, and those tests skip (the Docker-profile tests
# fail instead under CI=true, which .ci/run sets).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(podman runc uidmap mmdebstrap slurmctld slurmd slurm-client munge chromium)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo ".ci/services.sh: not root with apt-get: podman and Slurm tests will be skipped" >&2
        exit 0
    fi
    echo "==> installing ${missing[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ "$(id -u)" = 0 ]; then
    echo "==> starting Slurm (partition ci: this host; ci2: two slurmd on this host)"
    bash .ci/slurm.sh
fi
