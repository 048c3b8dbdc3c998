import subprocess
import sys

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
