# syntax=docker/dockerfile:1
# The image every containerised job runs in: profiles/docker (work tree bind-mounted over
# /workflow's copy) and profiles/aws-batch (the workflow at /workflow, inputs/outputs in S3).
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) \
#       -t refrag-workflow:$(git rev-parse --short HEAD) -t refrag-workflow:latest .
# GIT_COMMIT is stamped into the image (label org.opencontainers.image.revision and
# /workflow/.image-commit); the aws-batch profile refuses a work tree at another commit.
# Versions: the Python base is pinned by tag (pin the digest too for bit-for-bit rebuilds); the
# whole Python stack by requirements.lock. On Linux x86_64, PyPI's torch==2.13.0 is the CUDA
# build, so the same image serves CPU and GPU jobs (GPUs come from the nvidia runtime).
# BASE_IMAGE: any Debian bookworm image with python3 (3.11) and its venv module. Without a
# registry, make one of Debian's packages (what CI does, tests/test_profile_docker.py):
#   mmdebstrap --variant=minbase --include=python3,python3-venv bookworm - | podman import - debian-py
#   pip download --dest wheels -c requirements.lock . 'setuptools>=68'
#   podman build --build-arg BASE_IMAGE=localhost/debian-py --build-arg PIP_FIND_LINKS=/wheels \
#       --build-arg PIP_NO_INDEX=1 --volume $PWD/wheels:/wheels:ro -t refrag-workflow:latest .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG GIT_COMMIT=unknown
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# graphviz renders the DAG; procps gives `ps` to torchrun's elastic agent.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends graphviz procps \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 refrag \
    && useradd --uid 1000 --gid refrag --create-home --shell /bin/bash refrag \
    && python3 -m venv /opt/venv

WORKDIR /workflow

# Dependencies first (cached while only the workflow changes), then the project itself.
# Build arguments for pip: PIP_FIND_LINKS, a folder of wheels (e.g. a CPU torch); PIP_NO_INDEX=1,
# install from that folder only (offline); PIP_CERT, a CA bundle (behind a TLS-inspecting
# proxy). With podman, mount them: `podman build --volume`.
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ARG PIP_CERT
COPY requirements.lock pyproject.toml README.md ./
COPY refrag/ refrag/
RUN pip install --no-cache-dir -c requirements.lock . \
    && python -c "import refrag, snakemake, snakemake_storage_plugin_s3, torch"

# The workflow at the working directory: AWS Batch jobs run `python -m snakemake` here.
# .dockerignore is an allow-list: only the workflow's sources are in the build context.
COPY --chown=refrag:refrag . .
RUN echo "$GIT_COMMIT" > /workflow/.image-commit && chown refrag:refrag /workflow
LABEL org.opencontainers.image.revision=$GIT_COMMIT \
      org.opencontainers.image.title=refrag-workflow

USER refrag
CMD ["snakemake", "--help"]
