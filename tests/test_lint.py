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
    assert sys.version_info >= (3, 11)
