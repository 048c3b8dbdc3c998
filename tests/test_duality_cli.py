"""The ``duality`` command module: runs, reports JSON, exits 1 on a violated identity."""

from __future__ import annotations

import argparse
import json

import pytest

from dualflow.experiments.commands import duality


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    duality.add_arguments(p)
    return p.parse_args(list(argv))


SMALL = ("--state-dim", "3", "--obs-dim", "2", "--length", "20", "--hmm-states", "3")


def test_run_small_config_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r" / "duality.json", tmp_path / "track.png"
    rc = duality.run(_args(*SMALL, "--seeds", "2", "--out", str(out), "--plot", str(png)))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Kalman smoother mean: backprop vs RTS" in printed
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert report["config"]["state_dim"] == 3 and report["config"]["seeds"] == 2
    ids = [r["identity"] for r in report["rows"]]
    assert ids == [
        "Kalman smoother mean: backprop vs RTS",
        "Kalman smoother cov: backprop vs RTS",
        "Kalman log-lik: filter vs joint Gaussian",
        "HMM smoother marginals: backprop vs forward-backward",
        "Gaussian-linear net, hidden posterior mean: smooth vs exact",
        "Gaussian-linear net, hidden posterior var: smooth vs exact",
        "BNN posterior mean (mean |err| / mean sd): smooth vs IS",
    ]
    for r in report["rows"]:
        assert r["ok"] and r["cases"] == 2
        if r["exact"]:
            assert r["rel_err"] <= 1e-8
    bnn = report["rows"][-1]
    assert not bnn["exact"] and bnn["max_abs_err"] < 2.0  # approximate, but informative
    assert png.stat().st_size > 10_000
    assert report["plot"]["max_abs_diff"] < 1e-8


def test_run_exits_1_when_tolerance_is_impossible(capsys):
    rc = duality.run(_args(*SMALL, "--seeds", "1", "--tol", "1e-30"))
    assert rc == 1
    assert "FAIL" in capsys.readouterr().out


def test_float32_and_registered_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(duality, "ROW_PROVIDERS", list(duality.ROW_PROVIDERS))
    duality.register_rows(
        "extra", lambda args: [duality.Row("BNN vs importance sampling", 0.1, 1.0, None, 1)]
    )
    with pytest.raises(ValueError, match="already registered"):
        duality.register_rows("extra", lambda args: [])
    out = tmp_path / "r.json"
    rc = duality.run(_args(*SMALL, "--seeds", "1", "--dtype", "float32", "--out", str(out)))
    assert rc == 0  # the approximate row is reported, not enforced
    rows = json.loads(out.read_text())["rows"]
    assert rows[-1]["identity"] == "BNN vs importance sampling" and rows[-1]["exact"] is False


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="--state-dim must be >= 1"):
        duality.run(_args("--state-dim", "0"))
