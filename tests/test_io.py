"""Commands check their outputs before any work; missing extras name the pip line.

The sentinel for "before any work": every command below is given a data folder (or results
file) that does not exist, so a command that read its inputs before checking its outputs
would fail on the data with a different message (or, for ``quickstart``/``duality``, reach
the patched training/computation).
"""

import os
import sys
import tomllib

import pytest

from conftest import REPO
from dualflow.experiments.cli import main
from dualflow.experiments.io import EXTRAS, MissingExtraError, NotWritableError, check_writable, require_extra


@pytest.fixture
def blocked(tmp_path):
    """A path whose parent is a regular file: unwritable for every user, root included."""
    f = tmp_path / "afile"
    f.write_text("not a folder")
    return f / "sub"


# ----------------------------------------------------------------------------- check_writable


def test_check_writable_accepts_new_and_existing_paths_and_creates_nothing(tmp_path):
    check_writable(tmp_path / "a" / "b" / "out.json")
    check_writable(tmp_path / "a" / "b", "dir")
    assert list(tmp_path.iterdir()) == []  # nothing created, no probe file left behind
    existing = tmp_path / "out.json"
    existing.write_text("keep")
    check_writable(existing)
    assert existing.read_text() == "keep"  # not truncated
    check_writable(tmp_path, "dir")
    check_writable(None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_check_writable_names_the_path_and_the_reason(tmp_path, blocked):
    with pytest.raises(NotWritableError, match=rf"--out {blocked}/x.json: .*afile is a file, not a folder"):
        check_writable(blocked / "x.json", option="--out")
    with pytest.raises(NotWritableError, match="it is a folder, not a file"):
        check_writable(tmp_path, option="--out")
    with pytest.raises(NotWritableError, match="it exists and is not a folder"):
        check_writable(blocked.parent, "dir", option="--out-dir")
    assert issubclass(NotWritableError, ValueError)  # the CLI prints ValueErrors as one line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permission bits")
def test_check_writable_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(NotWritableError, match="cannot create files"):
            check_writable(ro / "new" / "out.json")
    finally:
        ro.chmod(0o700)


# ----------------------------------------------------------------------------- every command


def _commands(blocked, tmp_path):
    missing = str(tmp_path / "no-such-data")
    out = str(blocked / "out.json")
    cls = ["classify", "--dataset", "mnist", "--arch", "mlp", "--method", "bp", "--epochs", "1"]
    return {
        "quickstart": (["quickstart", "--epochs", "1", "--out-dir", str(blocked)], str(blocked)),
        "duality": (["duality", "--seeds", "1", "--out", out], out),
        "duality-plot": (["duality", "--seeds", "1", "--plot", str(blocked / "p.png")], str(blocked)),
        "uci": (["uci", "--dataset", "yacht", "--splits", "1", "--data-dir", missing, "--out", out], out),
        "classify": ([*cls, "--data-dir", missing, "--out", out], out),
        "classify-workdir": (
            [*cls, "--data-dir", missing, "--out", str(tmp_path / "r.json"), "--workdir", str(blocked)],
            str(blocked),
        ),
        "gradvar": (["gradvar", "--data-dir", missing, "--out", out], out),
        "convergence": (["convergence", "--data-dir", missing, "--out-dir", str(blocked)], str(blocked)),
        "report-uci": (["report", "uci", "--results", missing, "--out", out], out),
        "report-classify": (["report", "classify", "--results", missing, "--out", out], out),
    }


@pytest.mark.parametrize(
    "name",
    [
        "quickstart",
        "duality",
        "duality-plot",
        "uci",
        "classify",
        "classify-workdir",
        "gradvar",
        "convergence",
        "report-uci",
        "report-classify",
    ],
)
def test_every_command_checks_outputs_before_any_work(name, blocked, tmp_path, capsys, monkeypatch):
    import dualflow.train
    from dualflow.experiments.commands import duality

    def no_work(*_a, **_k):
        raise AssertionError("work started before the output check")

    monkeypatch.setattr(dualflow.train, "fit", no_work)
    monkeypatch.setattr(duality, "collect_rows", no_work)
    argv, path = _commands(blocked, tmp_path)[name]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "cannot write" in err and path in err, err


def test_classify_resume_without_workdir_is_an_error(tmp_path, capsys):
    argv = ["classify", "--dataset", "mnist", "--arch", "mlp", "--method", "bp", "--epochs", "1"]
    rc = main([*argv, "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "r.json"), "--resume"])
    assert rc == 2
    assert "--resume needs --workdir" in capsys.readouterr().err


# ----------------------------------------------------------------------------- extras


def test_extras_table_matches_pyproject():
    """Every extra the commands ask for is declared in pyproject.toml with those packages."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, mods in EXTRAS.items():
        assert extra in declared, extra
        reqs = {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in declared[extra]}
        assert set(mods.values()) <= reqs, (extra, mods, declared[extra])
    # the library itself depends on torch, numpy and tqdm only
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {d.split(">")[0].split("=")[0].strip() for d in deps} == {"torch", "numpy", "tqdm"}
    # dev (the test suite) pulls in every extra the experiments need
    dev = " ".join(declared["dev"])
    assert all(e in dev for e in ("experiments", "augment")), dev


def test_missing_extra_names_the_pip_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(MissingExtraError, match=r"scikit-learn.*pip install 'dualflow\[experiments\]'"):
        require_extra("experiments")
    rc = main(["quickstart", "--epochs", "1", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "pip install 'dualflow[experiments]'" in err
