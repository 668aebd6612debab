"""Helpers shared by the profile tests (docker, aws-batch, slurm)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)  # the project's environment running the tests


def unavailable(reason: str) -> None:
    """Skip, saying why; under CI=true fail instead, so that CI cannot pass without the test."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason}; CI must run this test (bash .ci/services.sh installs it)")
    pytest.skip(reason)


SKIP_DIRS = {".git", ".venv", ".snakemake", "results", "resources", "logs", ".pytest_cache"}


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
