"""ruff lint and format hold for the whole project (the README's style rules)."""

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO


def _ruff() -> list[str]:
    if importlib.util.find_spec("ruff") is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    return [sys.executable, "-m", "ruff"]


def test_ruff_check():
    out = subprocess.run(
        [*_ruff(), "check", "src", "tests", "benchmarks", "scripts"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-3000:]


def test_ruff_format():
    cmd = [*_ruff(), "format", "--check", "src", "tests", "benchmarks", "scripts"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]


def test_python_version():
    """One minimum Python version, declared consistently and honoured by the code.

    ``requires-python`` (what pip enforces) and ruff's ``target-version`` (what the lint checks
    against) name the same version; the running interpreter satisfies it; and every source file
    parses with that version's grammar (``ast`` ``feature_version``), so a newer interpreter in CI
    cannot let 3.12+ syntax slip in unnoticed.
    """
    import ast
    import re
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    m = re.fullmatch(r">=\s*3\.(\d+)", cfg["project"]["requires-python"])
    assert m, cfg["project"]["requires-python"]
    minor = int(m.group(1))
    assert cfg["tool"]["ruff"]["target-version"] == f"py3{minor}"
    assert sys.version_info >= (3, minor)
    files = [p for d in ("src", "tests", "benchmarks", "scripts") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 50
    for path in files:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, minor))
