"""UCI benchmark: data layout, protocol pieces, runner, CLI and report (real data, small runs)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import dualflow as df
from dualflow.experiments import uci
from dualflow.experiments.cli import main
from dualflow.experiments.data import uci as data

QUICK = {"steps": 30}  # a few optimizer steps: the tests check plumbing, not accuracy


@pytest.fixture
def uci_root(data_root: Path) -> Path:
    root = data_root / "uci"
    if not (root / "yacht" / "data.txt").is_file():
        pytest.fail(f"UCI data not found under {root}: set DUALFLOW_DATA to the shared data folder")
    return root


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("name", data.TABLE2)
def test_splits_disjoint_and_covering(name, data_root, uci_root):
    ds = data.load_uci(name, data_root, verify=True)
    n = ds.x.shape[0]
    assert ds.x.shape[1] >= 4 and ds.y.shape == (n,)
    assert ds.n_splits == (5 if name == "protein" else 20)
    assert ds.n_hidden == (100 if name == "protein" else 50)
    for i in range(ds.n_splits):
        tr, te = ds.train_idx[i], ds.test_idx[i]
        assert len(np.unique(tr)) == len(tr) and len(np.unique(te)) == len(te)
        assert np.intersect1d(tr, te).size == 0
        assert np.array_equal(np.union1d(tr, te), np.arange(n))
    xtr, _, _, yte = ds.split(0)
    assert xtr.shape == (ds.train_idx.shape[1], ds.x.shape[1]) and yte.shape == (ds.test_idx.shape[1],)


def test_aliases_and_folder_names_load_the_same(data_root, uci_root):
    a, b = data.load_uci("boston", data_root), data.load_uci("bostonHousing", data_root)
    assert a.name == b.name == "boston" and a.folder == "bostonHousing"
    assert np.array_equal(a.x, b.x) and np.array_equal(a.train_idx, b.train_idx)
    assert data.load_uci("yacht", uci_root).folder == "yacht"  # the uci folder itself as root


def test_user_folder_with_index_files(tmp_path, data_root, uci_root):
    """A user drops a folder in the source layout (index_*.txt instead of splits.npz)."""
    src = data.load_uci("yacht", data_root)
    d = tmp_path / "uci" / "my-set"
    d.mkdir(parents=True)
    for f in ("data.txt", "index_features.txt", "index_target.txt", "n_hidden.txt", "n_epochs.txt"):
        shutil.copy(src.path / f, d / f)
    (d / "n_splits.txt").write_text("2\n")
    for i in range(2):
        np.savetxt(d / f"index_train_{i}.txt", src.train_idx[i], fmt="%d")
        np.savetxt(d / f"index_test_{i}.txt", src.test_idx[i], fmt="%d")
    ds = data.load_uci("my-set", tmp_path)
    assert ds.name == "my-set" and ds.n_splits == 2
    assert np.array_equal(ds.train_idx, src.train_idx[:2])


def test_missing_data_and_bad_names_give_clear_errors(tmp_path, data_root, uci_root):
    with pytest.raises(data.DataNotFoundError) as e:
        data.load_uci("yacht", tmp_path / "nowhere")
    msg = str(e.value)
    assert "does not exist" in msg and "DUALFLOW_DATA" in msg and "uci/yacht" in msg and "--download" in msg
    with pytest.raises(data.DataNotFoundError, match="not found"):
        data.load_uci("no-such-set", data_root)
    with pytest.raises(ValueError, match="invalid data set name"):
        data.load_uci("../etc", data_root)


def test_cli_errors(tmp_path, capsys, data_root, uci_root):
    out = str(tmp_path / "r.json")
    assert main(["uci", "--dataset", "no-such-set", "--data-dir", str(data_root), "--out", out]) == 2
    assert "no-such-set" in capsys.readouterr().err
    assert main(["uci", "--dataset", "yacht", "--data-dir", str(tmp_path / "missing"), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "DUALFLOW_DATA" in err
    assert main(["uci", "--dataset", "yacht", "--method", "nope", "--data-dir", str(data_root)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not Path(out).exists()


def test_download_checks_checksums(tmp_path, data_root, uci_root):
    """The download code on a local mirror of the source files (no network): it rebuilds the
    standard layout, and a corrupted file is refused."""
    src = data.load_uci("yacht", data_root)
    mirror = tmp_path / "mirror" / "yacht"
    mirror.mkdir(parents=True)
    for f in ("data.txt", "index_features.txt", "index_target.txt", "n_splits.txt", "n_hidden.txt"):
        shutil.copy(src.path / f, mirror / f)
    shutil.copy(src.path / "n_epochs.txt", mirror / "n_epochs.txt")
    for i in range(src.n_splits):
        np.savetxt(mirror / f"index_train_{i}.txt", src.train_idx[i], fmt="%d")
        np.savetxt(mirror / f"index_test_{i}.txt", src.test_idx[i], fmt="%d")
    fetched: list[str] = []

    def fetch(url: str) -> bytes:
        fetched.append(url)
        return Path(url.removeprefix("file://")).read_bytes()

    base = f"file://{tmp_path}/mirror/{{folder}}/"
    dest = data.download_uci("yacht", tmp_path / "cache", base_url=base, fetch=fetch)
    assert dest == tmp_path / "cache" / "uci" / "yacht" and len(fetched) == 6 + 2 * 20
    got = data.load_uci("yacht", tmp_path / "cache", verify=True)
    assert np.array_equal(got.train_idx, src.train_idx) and np.array_equal(got.x, src.x)
    # corrupted data: refused, nothing left behind
    (mirror / "data.txt").write_bytes((src.path / "data.txt").read_bytes().replace(b"0.568", b"0.569", 1))
    with pytest.raises(ValueError, match="checksum mismatch"):
        data.download_uci("yacht", tmp_path / "cache2", base_url=base, fetch=fetch)
    assert not (tmp_path / "cache2" / "uci" / "yacht").exists()
    assert sorted(p.name for p in (tmp_path / "cache2" / "uci").iterdir()) == []
    # the recorded checksum is the one of the file we have
    want = data.CHECKSUMS["yacht"][0]
    assert hashlib.sha256((src.path / "data.txt").read_bytes()).hexdigest() == want


# ----------------------------------------------------------------------------- protocol


def test_standardizer_uses_training_statistics():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 2.0, size=(50, 3))
    a[:, 2] = 7.0  # constant column: std 0 -> 1
    s = data.Standardizer.fit(a)
    assert np.allclose(s.mean, a.mean(0)) and np.allclose(s.std[:2], a[:, :2].std(0)) and s.std[2] == 1.0
    z = s.transform(a)
    assert np.allclose(z[:, :2].mean(0), 0, atol=1e-12) and np.allclose(z[:, :2].std(0), 1)
    assert np.allclose(s.inverse(z), a)
    # a constant stored with rounding noise (naval's column 11) is constant too
    b = np.full((20, 1), 0.998) + 1e-16 * rng.normal(size=(20, 1))
    assert data.Standardizer.fit(b).std[0] == 1.0


def test_runner_standardises_with_training_rows_only(monkeypatch, data_root, uci_root):
    ds = data.load_uci("yacht", data_root)
    xtr, ytr, xte, yte = ds.split(0)
    seen: list[int] = []
    real = data.Standardizer.fit.__func__

    def spy(cls, a):
        seen.append(len(a))
        return real(cls, a)

    monkeypatch.setattr(uci.Standardizer, "fit", classmethod(spy))
    r1 = uci.train_and_evaluate(
        "bp", {**uci.METHODS["bp"].defaults, **QUICK}, xtr, ytr, xte, yte, hidden=8, epochs=2, seed=0
    )
    assert seen == [len(ytr), len(ytr)]  # inputs and target, training rows only
    # the test rows do not influence the fit: shifting them moves only the test error
    r2 = uci.train_and_evaluate(
        "bp", {**uci.METHODS["bp"].defaults, **QUICK}, xtr, ytr, xte, yte + 100.0, hidden=8, epochs=2, seed=0
    )
    assert r2["rmse"] > r1["rmse"] + 50
    fit_rows, val_rows = uci.validation_split(len(ytr), seed=3)
    assert np.intersect1d(fit_rows, val_rows).size == 0
    assert np.array_equal(np.union1d(fit_rows, val_rows), np.arange(len(ytr)))
    assert len(val_rows) == round(0.2 * len(ytr))


def test_log_likelihood_in_original_units_matches_hand_computation():
    rng = np.random.default_rng(1)
    y = rng.normal(20.0, 5.0, size=40)
    ys = data.Standardizer.fit(y[:30])  # "training" statistics
    mu_z = torch.tensor(rng.normal(size=40), dtype=torch.float64)
    var_z = torch.tensor(rng.uniform(0.1, 2.0, size=40), dtype=torch.float64)
    rmse, ll = uci.evaluate(df.Gaussian(mu_z.unsqueeze(1), var_z.unsqueeze(1)), y, ys)
    m, s = float(ys.mean), float(ys.std)
    mu, sd = mu_z.numpy() * s + m, np.sqrt(var_z.numpy()) * s  # predictive in original units
    by_hand = np.mean(-0.5 * np.log(2 * np.pi * sd**2) - 0.5 * ((y - mu) / sd) ** 2)
    assert ll == pytest.approx(by_hand, rel=1e-12)
    assert rmse == pytest.approx(np.sqrt(np.mean((y - mu) ** 2)), rel=1e-12)


def test_schedule():
    hp = {"steps": 2000, "batch_size": "auto"}
    assert uci.schedule(7373, 40, hp) == (148, 40)  # large set: the protocol's epochs
    assert uci.schedule(41157, 20, hp) == (412, 20)
    assert uci.schedule(277, 40, hp) == (277, 2000)  # small set: full batches, S steps
    assert uci.schedule(500, 40, {"steps": 100, "batch_size": 64}) == (64, 40)
    assert uci.schedule(500, 40, {"steps": 400, "batch_size": "full"}) == (500, 400)


def test_same_seed_same_numbers(data_root, uci_root):
    opts = uci.RunOptions(data_dir=str(data_root), select=True, overrides=dict(QUICK))
    a = uci.run_split("yacht", 1, "bp", opts)
    b = uci.run_split("yacht", 1, "bp", opts)
    assert (a["rmse"], a["ll"], a["hyperparameters"]) == (b["rmse"], b["ll"], b["hyperparameters"])
    assert [t["val_ll"] for t in a["selection"]["trials"]] == [t["val_ll"] for t in b["selection"]["trials"]]
    c = uci.run_split(
        "yacht", 1, "bp", uci.RunOptions(data_dir=str(data_root), seed=1, select=True, overrides=dict(QUICK))
    )
    assert c["seed"] != a["seed"] and c["ll"] != a["ll"]
    assert len(a["selection"]["trials"]) == len(uci.METHODS["bp"].grid)
    best = max(a["selection"]["trials"], key=lambda t: t["val_ll"])
    assert a["hyperparameters"] == best["hyperparameters"]


def test_two_workers_give_the_same_records(tmp_path, data_root, uci_root):
    opts = uci.RunOptions(data_dir=str(data_root), overrides=dict(QUICK))
    kw = dict(splits=2, log=lambda _m: None)
    one = uci.run_benchmark(["yacht"], ["bp"], opts, workers=1, **kw)
    two = uci.run_benchmark(["yacht"], ["bp"], opts, workers=2, out=tmp_path / "r.json", **kw)
    key = lambda r: r["split"]  # noqa: E731
    assert [(r["split"], r["ll"], r["rmse"]) for r in sorted(one, key=key)] == [
        (r["split"], r["ll"], r["rmse"]) for r in sorted(two, key=key)
    ]
    assert len(uci.load_records([tmp_path / "r.json"])) == 2


def test_diverging_candidate_is_skipped(monkeypatch, data_root, uci_root):
    real = uci.train_and_evaluate

    def flaky(method, hp, *args, **kw):
        if hp["lr"] == 0.1:
            raise FloatingPointError("non-finite loss")
        return real(method, hp, *args, **kw)

    monkeypatch.setattr(uci, "train_and_evaluate", flaky)
    r = uci.run_split(
        "yacht", 0, "bp", uci.RunOptions(data_dir=str(data_root), select=True, overrides=dict(QUICK))
    )
    assert r["hyperparameters"]["lr"] == 0.03 and not r["failed"] and math.isfinite(r["ll"])
    assert sum(t["val_ll"] == -math.inf for t in r["selection"]["trials"]) == 2


@pytest.mark.parametrize("method", list(uci.METHODS))
def test_every_method_runs_through_the_runner(method, data_root, uci_root):
    assert method in uci.available_methods()
    opts = uci.RunOptions(data_dir=str(data_root), overrides={**QUICK, "samples": 4})
    r = uci.run_split("yacht", 0, method, opts)
    assert r["implementation"] == "dualflow.methods" and not r["failed"]
    assert r["protocol"] == "default recipe" and r["variant"] == "samples=4"  # forced: a variant
    assert r["label"] == f"{method} (samples=4)"
    assert r["hyperparameters"] == {**uci.METHODS[method].defaults, **QUICK, "samples": 4}
    assert math.isfinite(r["ll"]) and 0 < r["rmse"] < 100


# ----------------------------------------------------------------------------- CLI + report


def test_cli_smoke_run_writes_records_and_report(tmp_path, data_root, uci_root):
    out = tmp_path / "uci.json"
    argv = ["uci", "--dataset", "yacht", "--method", "bp,ensemble", "--splits", "1", "--steps", "30"]
    assert main([*argv, "--data-dir", str(data_root), "--out", str(out), "--quiet"]) == 0
    obj = json.loads(out.read_text())
    assert {(r["dataset"], r["method"], r["split"]) for r in obj["records"]} == {
        ("yacht", "bp", 0),
        ("yacht", "ensemble", 0),
    }
    for r in obj["records"]:
        for key in ("rmse", "ll", "seconds", "seed", "hyperparameters", "versions", "selection", "n_train"):
            assert key in r
        assert math.isfinite(r["rmse"]) and math.isfinite(r["ll"]) and r["n_hidden"] == 50
        assert r["versions"]["torch"] == torch.__version__
    assert "dualflow uci --dataset yacht" in obj["meta"]["command"]
    # --resume: nothing left to do
    assert main([*argv, "--data-dir", str(data_root), "--out", str(out), "--quiet", "--resume"]) == 0
    assert len(json.loads(out.read_text())["records"]) == 2

    md = tmp_path / "rep" / "README.md"
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "notes.md").write_text("## Discussion\n\nhand-written notes\n")
    assert main(["report", "uci", "--results", str(out), "--out", str(md)]) == 0
    text = md.read_text()
    assert "| yacht |" in text and "ours: bp" in text and "paper BP" in text and "DVI" in text
    assert "hand-written notes" in text and "## Protocol" in text and "dualflow uci --dataset yacht" in text
    assert (tmp_path / "rep" / "uci.png").stat().st_size > 5000


def test_searched_and_heteroscedastic_rows_are_separate(tmp_path, data_root, uci_root):
    """Default, --search and noise=heteroscedastic runs of one method into one file: three rows,
    and --resume skips only the records of the same variant."""
    out = tmp_path / "uci.json"
    base = ["uci", "--dataset", "yacht", "--method", "bp", "--splits", "1", "--steps", "20"]
    base += ["--data-dir", str(data_root), "--out", str(out), "--quiet"]
    for extra in ([], ["--search"], ["--set", "noise=heteroscedastic"], ["--resume", "--search"]):
        assert main([*base, *extra]) == 0
    recs = json.loads(out.read_text())["records"]
    assert sorted(r["label"] for r in recs) == ["bp", "bp (heteroscedastic)", "bp (search)"]
    search = next(r for r in recs if r["variant"] == "search")
    assert search["protocol"] == "search" and len(search["selection"]["trials"]) == 3
    het = next(r for r in recs if r["variant"] == "heteroscedastic")
    assert het["hyperparameters"]["noise"] == "heteroscedastic" and math.isfinite(het["ll"])
    summary = uci.summarize(uci.load_records([out]))
    assert set(summary) == {("yacht", "bp"), ("yacht", "bp (search)"), ("yacht", "bp (heteroscedastic)")}


def test_report_marks_standing_and_best():
    from dualflow.experiments.commands.report import uci_tables

    summary = {
        ("boston", "bp"): {"ll": -2.30, "ll_se": 0.03, "rmse": 2.8, "rmse_se": 0.1, "n": 20, "seconds": 40.0},
        ("yacht", "bp"): {"ll": -2.90, "ll_se": 0.05, "rmse": 4.0, "rmse_se": 0.2, "n": 20, "seconds": 20.0},
    }
    t = uci_tables(summary, ["bp"])
    boston = next(line for line in t["ll"].splitlines() if line.startswith("| boston"))
    assert "**-2.30 ± 0.03**" in boston  # best in the row
    stand = {line.split(" | ")[0]: line for line in t["standing"].splitlines()}
    assert "**ahead** (+0.30)" in stand["| boston"] and "**ahead** (+0.10 vs MCD'18)" in stand["| boston"]
    assert "behind (-0.10)" in stand["| yacht"] and "vs DVI" in stand["| yacht"]
    yacht_rmse = next(line for line in t["rmse"].splitlines() if line.startswith("| yacht"))
    assert "(typo)" in yacht_rmse and "**0.67**" in yacht_rmse


def test_load_results_rejects_bad_files(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        uci.load_results([p])
    p.write_text(json.dumps({"records": [{"dataset": "yacht"}]}))
    with pytest.raises(ValueError, match="lacks"):
        uci.load_results([p])
    with pytest.raises(FileNotFoundError):
        uci.load_results([tmp_path / "missing.json"])


def test_two_phase_start_holds_the_variances_then_releases_them(data_root, uci_root):
    """mean_phase: the first share of the epochs trains the means only (every weight sd held),
    then all parameters; the run's result is finite and every rho is trainable again."""
    ds = uci.load_uci("yacht", str(data_root))
    xtr, ytr, xte, yte = ds.split(0)
    hp = {**uci.METHODS["bp"].defaults, "steps": 40, "mean_phase": 0.5, "mean_phase_sd": 1e-3}
    seen = []
    real = uci._hold_variances

    def spy(net, sd):
        seen.append(sd)
        real(net, sd)

    import unittest.mock

    with unittest.mock.patch.object(uci, "_hold_variances", spy):
        r = uci.train_and_evaluate("bp", hp, xtr, ytr, xte, yte, hidden=ds.n_hidden, epochs=40, seed=0)
    assert seen == [1e-3, None] and math.isfinite(r["ll"])
    net = torch.nn.Sequential(df.nn.Linear(3, 2))
    uci._hold_variances(net, 0.01)
    assert not net[0].weight_rho.requires_grad
    torch.testing.assert_close(net[0].weight_var, torch.full((2, 3), 1e-4))
    uci._hold_variances(net, None)
    assert net[0].weight_rho.requires_grad
