import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_demo_runs_the_library_on_the_default_models():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "refrag.cli",
            "--cache-dir",
            str(ROOT / "resources/models"),
            "demo",
            "--k",
            "16",
            "--max-new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "doc ada:" in out and "chunks" in out and "aligned prefix pairs" in out
    assert "decoder positions instead of" in out and "generated" in out


def test_help_lists_the_commands():
    result = subprocess.run(
        [sys.executable, "-m", "refrag.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for command in ("fetch-models", "demo", "chat"):
        assert command in result.stdout


def test_a_model_spec_that_cannot_resolve_is_one_line(tmp_path):
    from refrag.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--cache-dir", str(tmp_path), "fetch-models", "embedded:typo"])
    assert str(exc.value.code).startswith("refrag fetch-models: unknown embedded model 'typo'")
    assert list(tmp_path.iterdir()) == []
