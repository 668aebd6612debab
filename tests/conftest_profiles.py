"""Helpers shared by the profile tests (test_profile_docker.py, test_profile_aws_batch.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)  # the project's environment running the tests
SKIP_DIRS = {".git", ".venv", ".snakemake", "results", "resources", "logs", ".pytest_cache"}

# A rule helper the workflow's GPU rules use (workflow/rules/common.smk); the probe workflows
# below define this copy only when the workflow does not (yet) define it.
GPU_RESOURCES = """
if "gpu_resources" not in globals():

    def gpu_resources(gpus, vcpu_per_gpu=8, mem_mb_per_gpu=61440, timeout_s=86400):
        count = gpus if callable(gpus) else (lambda wildcards: gpus)
        return {
            "gpu": count,
            "aws_batch_gpu": count,
            "aws_batch_vcpu": lambda wildcards: max(2, vcpu_per_gpu * count(wildcards)),
            "aws_batch_mem_mb": lambda wildcards: max(8192, mem_mb_per_gpu * count(wildcards)),
            "aws_batch_task_timeout": timeout_s,
            "aws_batch_job_definition": lambda wildcards: (
                "refrag-gpu" if count(wildcards) else "refrag-cpu"
            ),
        }
"""


def copy_worktree(dst: Path) -> Path:
    """The workflow's sources (what `git ls-files` shows, untracked included) under dst."""
    dst.mkdir(parents=True, exist_ok=True)
    try:
        listed = (
            subprocess.run(
                ["git", "ls-files", "-co", "--exclude-standard", "-z"],
                cwd=REPO,
                capture_output=True,
                check=True,
            )
            .stdout.decode()
            .split("\0")
        )
    except (OSError, subprocess.CalledProcessError):
        listed = [
            str(p.relative_to(REPO))
            for p in REPO.rglob("*")
            if not SKIP_DIRS & set(p.relative_to(REPO).parts)
        ]
    for rel in filter(None, listed):
        src = REPO / rel
        if not (src.is_file() or src.is_symlink()) or SKIP_DIRS & set(Path(rel).parts):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            (dst / rel).symlink_to(src.readlink())
        else:
            shutil.copy2(src, dst / rel)
    return dst
