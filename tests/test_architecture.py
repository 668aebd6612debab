"""The library's rooms: one-way imports (import-linter), small files, exits only in the CLI;
every workflow rule names the project's one environment."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "refrag"


def test_import_contracts_are_kept():
    """pyproject.toml's [tool.importlinter] contracts: layers and the serving boundary."""
    lint = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "2 kept, 0 broken" in lint.stdout


def test_every_subpackage_says_what_it_holds_and_may_import():
    for init in LIBRARY.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init.relative_to(ROOT)}: no docstring naming its imports"


def test_no_library_file_is_over_500_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in LIBRARY.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert not long, long


def test_only_the_cli_ends_the_program():
    """Library code raises exceptions; refrag/cli.py alone turns them into exit codes."""
    found = []
    for path in LIBRARY.rglob("*.py"):
        if path.name == "cli.py" and path.parent == LIBRARY:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = getattr(exc, "id", None)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = f"{getattr(node.func.value, 'id', '')}.{node.func.attr}"
            if name in ("SystemExit", "sys.exit", "os._exit"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def test_every_rule_names_the_one_conda_environment_and_it_installs_refrag():
    """`conda: CONDA_ENV` in every rule (--sdm conda); the file exists beside the rule files'
    folder, and its post-deploy script installs refrag with the pinned stack."""
    for smk in (ROOT / "workflow/rules").glob("*.smk"):
        text = smk.read_text()
        rules = re.findall(r"^rule (\w+):", text, re.MULTILINE)
        named = re.findall(r"^    conda:\n        CONDA_ENV$", text, re.MULTILINE)
        assert len(named) == len(rules), f"{smk.name}: {len(rules)} rules, {len(named)} conda:"
    common = (ROOT / "workflow/rules/common.smk").read_text()
    env = re.search(r'^CONDA_ENV = "(.+)"$', common, re.MULTILINE).group(1)
    env_file = (ROOT / "workflow/rules" / env).resolve()
    assert "python=3.11" in yaml.safe_load(env_file.read_text())["dependencies"]
    post_deploy = env_file.with_name(env_file.stem + ".post-deploy.sh").read_text()
    assert "-c requirements.lock -e ." in post_deploy


def test_the_global_container_is_the_configured_image():
    snakefile = (ROOT / "Snakefile").read_text()
    assert re.search(r'^container: config\["container"\]$', snakefile, re.MULTILINE)
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    assert schema["properties"]["container"]["default"].endswith("refrag-workflow:latest")
