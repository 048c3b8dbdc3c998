import re
import subprocess
import sys
from pathlib import Path

import torch

import dualflow as df


def test_import_does_not_pull_experiment_deps():
    code = "import sys, dualflow; print('matplotlib' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_cli_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "dualflow.experiments", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "quickstart" in out.stdout


def test_quickstart_runs(tmp_path):
    from dualflow.experiments.cli import main

    rc = main(["quickstart", "--epochs", "30", "--out-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    assert (tmp_path / "quickstart.png").stat().st_size > 1000
    import json

    res = json.loads((tmp_path / "quickstart.json").read_text())
    assert res["methods"]["bp"]["test_rmse"] < res["methods"]["constant"]["test_rmse"]


def test_small_mlp_forward():
    net = df.nn.Sequential(df.nn.Linear(3, 8), df.nn.ReLU(), df.nn.Linear(8, 2))
    out = net(torch.randn(5, 3))
    assert isinstance(out, df.Gaussian)
    assert out.mean.shape == (5, 2) and bool((out.var > 0).all())


def test_submodules_are_attributes_and_import_stays_light():
    """``import dualflow as df; df.methods`` works (also ``optim``, ``graphical``, ``models``);
    ``import dualflow`` itself imports none of them and no experiment dependency."""
    heavy = ["matplotlib", "sklearn", "dualflow.experiments", "dualflow.models"]
    code = (
        "import sys, dualflow as df\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
        "print(df.methods.available()[0], df.optim.NaturalGradient.__name__, df.graphical.__name__, "
        "df.models.list_models()[0])\n"
        "print(sorted(set(dir(df)) >= {'methods', 'optim', 'graphical', 'models'} for _ in [0]))\n"
        "print('matplotlib' in sys.modules, 'sklearn' in sys.modules)\n"
        "try:\n    df.nope\nexcept AttributeError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "[]", lines
    assert lines[1] == "bp NaturalGradient dualflow.graphical densenet_bc", lines
    assert lines[2] == "[True]" and lines[3] == "False False", lines
    assert lines[4] == "module 'dualflow' has no attribute 'nope'"


def _readme_python_blocks() -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    """Every ``python`` code block of the README runs, in order, in one fresh namespace (later
    blocks use names of earlier ones, as a reader would). Only the epoch counts (to 2) and HMC
    draws (to 20) are cut."""
    blocks = _readme_python_blocks()
    assert len(blocks) >= 3, "the README lost its code examples"
    monkeypatch.chdir(tmp_path)  # snippets may write checkpoints under ./run
    ns: dict = {}
    for k, code in enumerate(blocks):
        code = re.sub(r"epochs=\d+", "epochs=2", code)
        code = re.sub(r"(warmup|samples)=\d+", r"\1=20", code)
        exec(compile(code, f"README.md python block {k}", "exec"), ns)
    assert isinstance(ns["p"], df.Gaussian)
