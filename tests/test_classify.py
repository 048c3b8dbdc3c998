"""Image classification runner: metrics, the command on the five Table-1 configurations,
exact resume, DDP (2 gloo processes) against one process, AMP, bad input, report."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import dualflow as df
from conftest import data_dir
from dualflow import methods, models
from dualflow.experiments import classify as C
from dualflow.experiments import distributed as ddist
from dualflow.experiments import metrics as M
from dualflow.experiments.cli import main
from dualflow.experiments.data import BatchLoader, load_mnist
from dualflow.train import MixedTargets

TINY = ["--limit-train", "256", "--arch-opt", "width=64", "--samples", "2", "--batch-size", "64"]


@pytest.fixture
def mnist_dir(data_root: Path) -> Path:
    if not (data_root / "mnist" / "train.npz").is_file():
        pytest.fail(f"MNIST not found under {data_root}: set DUALFLOW_DATA to the shared data folder")
    return data_root


# ----------------------------------------------------------------------------- metrics

# four examples, three classes; confidences 0.7, 0.5, 0.5, 0.85 (none on a bin edge)
PROBS = torch.tensor(
    [[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.25, 0.25, 0.5], [0.05, 0.1, 0.85]], dtype=torch.float64
)
LABELS = torch.tensor([0, 2, 2, 1])


def test_metrics_hand_computed():
    m = M.classification_metrics(PROBS, LABELS)
    # predictions 0, 1, 2, 2: the 2nd and 4th are wrong
    assert m["error"] == pytest.approx(0.5)
    assert m["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.4) + math.log(0.5) + math.log(0.1)) / 4)
    # Brier rows: .09+.04+.01, .01+.25+.36, .0625+.0625+.25, .0025+.81+.7225
    assert m["brier"] == pytest.approx((0.14 + 0.62 + 0.375 + 1.535) / 4)
    # bins of width 1/15: 0.7 -> bin 10 (acc 1), 0.5 and 0.5 -> bin 7 (acc 1/2), 0.85 -> bin 12 (acc 0)
    assert m["ece"] == pytest.approx((abs(1 - 0.7) + 2 * abs(0.5 - 0.5) + abs(0 - 0.85)) / 4)
    assert m["nonempty_bins"] == 3 and m["n"] == 4
    # one bin: |mean accuracy - mean confidence|
    assert M.expected_calibration_error(PROBS, LABELS, bins=1) == pytest.approx(abs(0.5 - 2.55 / 4))
    assert M.brier_score(PROBS, LABELS) == pytest.approx(m["brier"])
    assert M.nll(PROBS, LABELS) == pytest.approx(m["nll"]) and M.error_rate(PROBS, LABELS) == 0.5


def test_metrics_edges_and_additivity():
    # perfect, certain predictions: every metric 0; confidence 1 falls in the last bin
    eye = torch.eye(3)
    m = M.classification_metrics(eye, torch.arange(3))
    assert m == {"error": 0.0, "nll": 0.0, "ece": 0.0, "brier": 0.0, "n": 3, "nonempty_bins": 1}
    # a probability of exactly 0 on the label gives a large finite NLL
    assert 80 < M.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) < 100
    # sums over shards add up to the sums of the whole (the DDP reduction)
    s = M.metric_sums(PROBS[:1], LABELS[:1]) + M.metric_sums(PROBS[1:], LABELS[1:])
    assert M.finalize(s) == pytest.approx(M.classification_metrics(PROBS, LABELS))
    with pytest.raises(ValueError, match="labels"):
        M.metric_sums(PROBS, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        M.metric_sums(PROBS[0], LABELS[:1])


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def table1_runs(tmp_path_factory):
    """The five Table-1 configurations, MNIST, 256 images, 1 epoch, a small MLP."""
    data_root = data_dir()
    if not (data_root / "mnist" / "train.npz").is_file():
        pytest.fail(f"MNIST not found under {data_root}: set DUALFLOW_DATA to the shared data folder")
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("table1")
    rcs = {}
    for m in C.TABLE1_METHODS:
        argv = ["classify", "--dataset", "mnist", "--arch", "mlp", "--method", m, "--epochs", "1"]
        argv += [*TINY, "--val", "64", "--data-dir", str(data_root), "--threads", "1", "--quiet"]
        argv += ["--out", str(out / f"{m}.json")]
        rcs[m] = main(argv)
    return out, rcs


REQUIRED = (
    *("dataset", "arch", "method", "test_error", "test_nll", "test_ece", "test_brier", "epochs", "seconds"),
)


@pytest.mark.parametrize("method", C.TABLE1_METHODS)
def test_command_writes_record(table1_runs, method):
    out, rcs = table1_runs
    assert rcs[method] == 0
    rec = json.loads((out / f"{method}.json").read_text())
    for k in REQUIRED:
        assert k in rec, k
    assert (rec["dataset"], rec["arch"], rec["method"], rec["epochs"]) == ("mnist", "mlp", method, 1)
    assert 0.0 <= rec["test_error"] <= 1.0 and rec["n_test"] == 10000
    assert all(math.isfinite(rec[k]) and rec[k] >= 0 for k in ("test_nll", "test_ece", "test_brier"))
    assert rec["normalization"] == C.TABLE1_NORMALIZATION[method]
    assert rec["n_train"] == 192 and rec["n_val"] == 64 and len(rec["history"]) == 1
    assert {"train_loss", "train_error", "val_loss", "val_error"} <= set(rec["history"][0])
    assert rec["command"].startswith("dualflow classify --dataset mnist --arch mlp --method " + method)
    assert (out / f"{method}.png").stat().st_size > 5000
    if methods.traits_of(method).natural_gradient:
        assert rec["optimizer"] == "ng+adam" and rec["ng_data_size"] == 192


def test_report_classify(table1_runs, tmp_path):
    out, _ = table1_runs
    text = C.report_classify([out], tmp_path / "README.md", notes="notes here")
    assert (tmp_path / "README.md").read_text() == text
    for m in C.TABLE1_METHODS:
        assert f"`{m}`" in text
    assert "- MNIST, mlp (width=64): BP/NF+NG" in text and "claim 'NG helps'" in text
    assert "notes here" in text and "dualflow classify" in text
    with pytest.raises(ValueError, match="not a JSON file"):
        C.report_classify([tmp_path / "README.md"], tmp_path / "x.md")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="no classify records"):
        C.report_classify([tmp_path / "other.json"], tmp_path / "x.md")


# ----------------------------------------------------------------------------- resume


def test_resume_equals_uninterrupted(mnist_dir, tmp_path):
    """reparam (weight sampling), BatchNorm, mixup+cutmix, validation: every RNG consumer."""
    kw = dict(
        dataset="mnist", arch="mlp", method="reparam", epochs=2, batch_size=64, limit_train=320, val=64,
        augment="mixup,cutmix", arch_options={"width": 32}, samples=2, data_dir=str(mnist_dir), threads=1,
    )  # fmt: skip
    full = C.train_and_evaluate(C.ClassifyConfig(**kw), tmp_path / "a", log=None)
    for stop in (2, 4):  # mid-epoch, and at the end of epoch 1
        wd = tmp_path / f"b{stop}"
        part = C.train_and_evaluate(C.ClassifyConfig(**kw, stop_after_steps=stop), wd, log=None)
        assert part["interrupted"] and part["global_step"] == stop
        res = C.train_and_evaluate(C.ClassifyConfig(**kw), wd, resume=True, log=None)
        assert res["resumed"] is not None
        for k in ("test_error", "test_nll", "test_ece", "test_brier"):
            assert res[k] == full[k], (stop, k)
        strip = ("train_seconds", "val_seconds")
        assert [{k: v for k, v in e.items() if k not in strip} for e in res["history"]] == [
            {k: v for k, v in e.items() if k not in strip} for e in full["history"]
        ]
    # a different configuration refuses the checkpoint
    with pytest.raises(ValueError, match="different configuration"):
        C.train_and_evaluate(C.ClassifyConfig(**{**kw, "lr": 0.5}), tmp_path / "a", resume=True, log=None)


def test_runner_restores_modes_and_names_a_bad_checkpoint(mnist_dir, tmp_path, capsys):
    """The runner's thread count (and TF32 on CUDA) apply to the run only; a truncated
    checkpoint under --resume is one clear error naming the file."""
    argv = ["classify", "--dataset", "mnist", "--arch", "mlp", "--method", "bp", "--epochs", "1", *TINY]
    argv += ["--data-dir", str(mnist_dir), "--threads", "1", "--quiet", "--workdir", str(tmp_path / "wd")]
    torch.set_num_threads(2)
    tf32 = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    assert main([*argv, "--out", str(tmp_path / "r.json"), "--stop-after-steps", "2"]) == 0
    assert torch.get_num_threads() == 2
    assert (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    ) == tf32
    ck = tmp_path / "wd" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    assert main([*argv, "--out", str(tmp_path / "r.json"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "not a readable checkpoint" in err and str(ck) in err and "Traceback" not in err


def test_loop_data_term_is_the_method_loss_and_mixes_targets():
    """The step's data term (the loop's Objective, used by classify) is the method's own loss of
    its training passes; with mixed targets it is lam J(y_a) + (1 - lam) J(y_b)."""
    torch.manual_seed(0)
    build = models.builder("mlp", num_classes=10, in_channels=1, width=16)
    x, y, y2 = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), torch.randint(0, 10, (8,))
    for name in ("bp", "reparam-ng-ensemble", "vanilla", "ensemble"):
        m = methods.create(name, build, task="classification", ensemble_size=2)
        obj = m.objective(0.0)
        torch.manual_seed(1)
        a = obj(x, MixedTargets(y, y, 1.0)).data
        torch.manual_seed(1)
        assert torch.equal(a, m.loss(m.training_outputs(x), y)), name
        torch.manual_seed(1)
        mixed = obj(x, MixedTargets(y, y2, 0.3)).data
        torch.manual_seed(1)
        outs = m.training_outputs(x)
        torch.testing.assert_close(mixed, 0.3 * m.loss(outs, y) + 0.7 * m.loss(outs, y2), msg=name)


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grads(method: methods.Method) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}


def _setup_method(seed: int) -> tuple[methods.Method, C.Resolved]:
    cfg = C.ClassifyConfig(dataset="mnist", arch="mlp", method="bp", arch_options={"width": 32})
    r = C.resolve(cfg, 60000)
    build = models.builder("mlp", num_classes=10, in_channels=1, normalization="none", width=32)
    torch.manual_seed(seed)
    return methods.create("bp", build, task="classification"), r


def _ddp_worker(rank: int, world: int, port: int, data_dir: str, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    info = ddist.setup("cpu")  # env:// with gloo, as under torchrun
    assert info.world_size == world and info.rank == rank and info.backend == "gloo"
    data = load_mnist(data_dir)
    method, r = _setup_method(seed=3)
    step = ddist.parallel(info).wrap(method.objective(r.kl_weight_abs))
    loader = BatchLoader(data.x_train[:64], data.y_train[:64], 8, seed=5, num_replicas=world, rank=rank)
    xb, yb = next(iter(loader))
    loss = step(data.normalize(xb), yb).loss
    loss.backward()
    if rank == 0:
        torch.save(_grads(method), Path(out_dir) / "ddp_grads.pt")
    # a whole run on 2 processes: metrics summed over the ranks, files from rank 0 only
    cfg = C.ClassifyConfig(
        dataset="mnist", arch="mlp", method="bp", epochs=1, limit_train=128, val=32, batch_size=16,
        arch_options={"width": 16}, data_dir=data_dir, device="cpu",
    )  # fmt: skip
    rec = C.train_and_evaluate(cfg, Path(out_dir) / "wd", out=Path(out_dir) / "ddp.json", log=None)
    assert rec["world_size"] == world and rec["n_test"] == 10000 and rec["global_batch_size"] == 32
    ddist.cleanup()


def test_ddp_gradients_equal_single_process(mnist_dir, tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(mnist_dir), str(tmp_path)), nprocs=world, join=True)
    ddp = torch.load(tmp_path / "ddp_grads.pt")
    # one process on the global batch: the union of the two shards of the first batch
    data = load_mnist(mnist_dir)
    method, r = _setup_method(seed=3)
    xb, yb = next(iter(BatchLoader(data.x_train[:64], data.y_train[:64], 8 * world, seed=5)))
    loss = method.objective(r.kl_weight_abs)(data.normalize(xb), yb).loss
    loss.backward()
    single = _grads(method)
    assert set(single) == set(ddp) and len(single) == 12  # 3 layers x (weight, bias) x (mu, rho)
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-8, msg=k)
    rec = json.loads((tmp_path / "ddp.json").read_text())
    assert rec["world_size"] == 2 and rec["n_train"] == 96
    assert (tmp_path / "ddp.png").is_file() and (tmp_path / "wd" / "checkpoint.pt").is_file()


# ----------------------------------------------------------------------------- AMP


def test_amp_bf16_keeps_moments_close():
    """bf16 matmuls/convs with fp32 moment rules: output moments of a Bayesian ResNet-8 stay
    within a few per mille of float32."""
    torch.manual_seed(0)
    net = models.create("resnet8", normalization="none", bayes=True)
    x = torch.randn(8, 3, 32, 32)
    ref = net(x)
    with df.train.mixed_precision(net, "cpu"):
        out = net(x)
    assert out.mean.dtype == torch.float32 and out.var.dtype == torch.float32
    after = net(x)  # hooks removed and autocast left on exit: float32 again, exactly
    assert torch.equal(after.mean, ref.mean) and torch.equal(after.var, ref.var)
    rel_m = (out.mean - ref.mean).norm() / ref.mean.norm()
    rel_v = ((out.var - ref.var).abs() / ref.var).max()
    assert rel_m < 0.02 and rel_v < 0.02, (float(rel_m), float(rel_v))


@pytest.mark.parametrize("method", ["vanilla", "bp"])
def test_amp_run_on_cpu(mnist_dir, tmp_path, method):
    """The --amp path end to end (CPU bf16 autocast): same metrics as float32 up to bf16 noise."""
    recs = {}
    for amp in (False, True):
        argv = ["classify", "--dataset", "mnist", "--arch", "mlp", "--method", method, "--epochs", "1", *TINY]
        argv += [
            "--data-dir",
            str(mnist_dir),
            "--threads",
            "1",
            "--quiet",
            "--out",
            str(tmp_path / f"{amp}.json"),
        ]
        assert main(argv + (["--amp"] if amp else [])) == 0
        recs[amp] = json.loads((tmp_path / f"{amp}.json").read_text())
    assert recs[True]["amp"].startswith("bf16") and recs[False]["amp"] == "off"
    assert abs(recs[True]["test_nll"] - recs[False]["test_nll"]) < 0.05
    assert abs(recs[True]["test_error"] - recs[False]["test_error"]) < 0.05


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--arch", "resnet21"], "unknown model 'resnet21'"),
        (["--method", "bpp"], "unknown method 'bpp'"),
        (["--dataset", "svhn"], "unknown dataset 'svhn'"),
        (["--augment", "crop"], "unknown augmentation 'crop'"),
        (["--val", "256"], "val (256) must be smaller"),
        (["--method", "bp-ng", "--optimizer", "sgd"], "does not apply"),
        (["--arch-opt", "widht=3"], "unknown option"),
    ],
)
def test_bad_input_exits_nonzero(mnist_dir, tmp_path, capsys, change, message):
    argv = ["classify", "--dataset", "mnist", "--arch", "mlp", "--method", "bp", "--epochs", "1", *TINY]
    argv += ["--data-dir", str(mnist_dir), "--out", str(tmp_path / "r.json")]
    argv += change  # later options win
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "dualflow classify: error:" in err and message in err
    assert not (tmp_path / "r.json").exists()


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    argv = ["classify", "--dataset", "cifar10", "--arch", "resnet8", "--method", "bp", "--epochs", "1"]
    argv += ["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cifar10 data not found" in err and "DUALFLOW_DATA" in err


def test_report_hook_for_dualflow_report(table1_runs, tmp_path):
    """``commands.classify.REPORT`` is the ``(help, add_arguments, run)`` triple that
    ``dualflow report``'s registry takes: ``"classify": Report(*REPORT)``."""
    import argparse

    from dualflow.experiments.commands import classify as cmd

    help_text, add_arguments, run = cmd.REPORT
    assert "Table 1" in help_text
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--results", str(table1_runs[0]), "--out", str(tmp_path / "R.md")])
    assert run(args) == 0 and "BP/NF+NG" in (tmp_path / "R.md").read_text()


def test_progress_bars_inside_epochs_and_evaluations(mnist_dir, tmp_path, capsys):
    argv = ["classify", "--dataset", "mnist", "--arch", "mlp", "--method", "vanilla", "--epochs", "1", *TINY]
    argv += ["--val", "64", "--data-dir", str(mnist_dir), "--threads", "1", "--out", str(tmp_path / "r.json")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    for bar in ("train:", "validation:", "test:"):  # tqdm bars on stderr
        assert bar in captured.err, bar
    assert "epoch   1/1" in captured.out and "test: error" in captured.out
