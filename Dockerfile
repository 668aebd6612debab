# syntax=docker/dockerfile:1
# The image every containerised job runs in: profiles/docker (work tree bind-mounted over
# /workflow's copy) and profiles/aws-batch (the workflow at /workflow, inputs/outputs in S3).
#   docker build -t refrag-workflow:$(git rev-parse --short HEAD) -t refrag-workflow:latest .
# Versions: the Python base is pinned by tag (pin the digest too for bit-for-bit rebuilds); the
# whole Python stack by requirements.lock. On Linux x86_64, PyPI's torch==2.13.0 is the CUDA
# build, so the same image serves CPU and GPU jobs (GPUs come from the nvidia runtime).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MPLCONFIGDIR=/tmp/matplotlib

# graphviz renders the DAG; procps gives `ps` to torchrun's elastic agent.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends graphviz procps \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 refrag \
    && useradd --uid 1000 --gid refrag --create-home --shell /bin/bash refrag

WORKDIR /workflow

# Dependencies first (cached while only the workflow changes), then the project itself.
COPY requirements.lock pyproject.toml README.md ./
COPY refrag/ refrag/
RUN pip install -c requirements.lock . \
    && python -c "import refrag, snakemake, snakemake_storage_plugin_s3, torch"

# The workflow at the working directory: AWS Batch jobs run `python -m snakemake` here.
COPY --chown=refrag:refrag . .
RUN chown refrag:refrag /workflow

USER refrag
CMD ["snakemake", "--help"]
