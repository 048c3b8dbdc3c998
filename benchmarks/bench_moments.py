"""Moment accuracy of whole networks against weight-sampling Monte Carlo, and of max-pool rules.

Part 1, whole networks. For a network with mean-field Gaussian weights ``q`` and a fixed
batch of real test images, the output moments of moment propagation (BP, Algorithm 1) are
compared with the mean and variance of the *point* network's logits over ``S`` weight draws
from ``q`` (vmapped ``functional_call``; each draw is one whole network, so every correlation
that weight sharing creates is in the reference). Per logit: the mean error in units of the
MC standard deviation, ``|m - m_mc| / sd_mc``, and the relative variance error
``|v - v_mc| / v_mc``; the tables give their median and maximum over the ``B x 10`` logits.
MC resolution (one standard error): ``1/sqrt(S)`` sd for the mean, about ``sqrt(2/S)`` for
the variance (``S = 4000``: 0.016 sd, 2.2%).

Networks: MLP 784-400-400-400-10 (MNIST), LeNet-5 (MNIST), a VGG-style Conv-ReLU-MaxPool
stack (``vgg16`` with blocks (2, 2, 2) of 16/32/64 channels, CIFAR-10), ResNet-8 (CIFAR-10,
no max pooling) and a ResNet-style network with a ResNet-ImageNet stem (conv, 3x3/2 max
pool) and two residual blocks (CIFAR-10). Normalisation-free, default initialisation
(``init_var_ratio=0.01``); "trained": after BP training on a training subset
(:func:`dualflow.train.fit`, Adam, the default configuration below).

Configurations of the max pooling (the same weights):

* ``act->pool, tree``: the ReLU before the pool, pairwise Clark tree (the library before
  this work);
* ``pool->act, tree``: the pool-before-activation rewrite only;
* ``pool->act, quad``: rewrite + exact moments of the max of independent Gaussians;
* ``pool->act, corr (meanfield)``: rewrite + Clark with the window covariances the
  convolution implies for independent inputs;
* ``pool->act, corr (smooth)``: rewrite + Clark with window covariances that treat the
  propagated input noise as spatially smooth (the default).

Cost: forward + backward time of one training step (NLL + KL/N, batch 64) relative to
``act->pool, tree``, median over ``--time-repeats`` interleaved repeats after one warm-up round,
one thread; measured at init only (the cost does not depend on the weights' values; the
``quad`` rule makes it expensive: about 30 s per step of the max-pool-stem ResNet).

Part 2, max-pool rules on 2x2 windows of *independent* Gaussians, against 200k-sample MC:
realistic windows (the Gaussian pre-activation windows of the VGG-style net, initialised
and trained) and adversarial ones; the rewrite on the same windows (MC of
``maxpool(relu(x))``); and the cost of each rule on a (64, 32, 16, 16) map.

Part 3, where the error comes from: the moments after every top-level layer of the
trained conv nets against MC of the truncated network.

MC standard error: besides the nominal resolution above, the logits' MC mean and variance get
an empirical standard error by batch means (the draws split into ``--mc-groups`` groups; the
spread of the group means and group variances), which also covers non-Gaussian logits; the
tables give its median over the logits, in MC sds for the mean and relative for the variance.

Usage::

    python benchmarks/bench_moments.py [--samples 4000] [--images 16] [--train-scale 1]
        [--nets mlp,lenet5,vgg,resnet8,resnet-mp] [--quick] [--workdir DIR]

The default is the full configuration (more than an hour on one busy CPU thread). The reduced
configuration of the committed results (21 min on one thread of the shared 2-core machine,
beside a 2-worker job; one command line)::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_moments.py --samples 3000 --images 16
        --train-scale 0.5 --time-repeats 3 --window-mc 100000

Needs ``$DUALFLOW_DATA`` (MNIST, CIFAR-10). Trained weights (named by their training steps) and
finished parts are cached in ``--workdir`` (default ``runs/bench_moments``), so an interrupted run
resumes. Writes ``benchmarks/results/moments.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import dualflow as df
from dualflow import models, rules
from dualflow import nn as dnn
from dualflow.experiments.data.images import load_cifar10, load_mnist
from dualflow.experiments.io import check_writable
from dualflow.models.blocks import LayerFactory
from dualflow.nn.base import BayesLayer
from dualflow.nn.rewrite import is_monotone
from dualflow.train import TrainConfig, fit

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_VAR, TARGET_MEAN = 0.10, 0.05


# ----------------------------------------------------------------------------- networks


def _resnet_maxpool(bayes: bool) -> dnn.Sequential:
    """conv3x3(16) -> maxpool 3x3/2 -> ReLU -> 2 basic blocks (16 ch, gains 1/sqrt 2) -> GAP -> fc."""
    make = LayerFactory(bayes=bayes, normalization="none")

    def block() -> torch.nn.Module:
        branch = dnn.Sequential(
            make.conv(16, 16, 3), make.act(), make.conv(16, 16, 3), make.skip_scale(0.5**0.5)
        )
        return dnn.Sequential(dnn.Residual(branch), make.act())

    body = dnn.Sequential(
        make.conv(3, 16, 3, gain=1.0),
        make.act(),
        dnn.MaxPool2d(3, 2, 1),
        block(),
        block(),
        dnn.GlobalAvgPool2d(),
        make.linear(16, 10),
    )
    return dnn.set_checks(body, False)


def _layer_name(mod: torch.nn.Module) -> str:
    """Row label: the class name, ``ReLU`` for the op table's relu activation."""
    if isinstance(mod, dnn.Activation) and mod.name == "relu":
        return "ReLU"
    return type(mod).__name__


@dataclass(frozen=True)
class Net:
    key: str
    name: str
    dataset: str
    build: Callable[[bool], torch.nn.Module]
    has_pool: bool
    train_steps: int


NETS = [
    Net(
        "mlp",
        "MLP 784-400x3-10",
        "mnist",
        lambda b: models.create("mlp", in_channels=1, depth=3, bayes=b),
        False,
        400,
    ),
    Net("lenet5", "LeNet-5", "mnist", lambda b: models.create("lenet5", in_channels=1, bayes=b), True, 400),
    Net(
        "vgg",
        "VGG-style (2,2,2)x(16,32,64)",
        "cifar10",
        lambda b: models.create("vgg16", blocks=(2, 2, 2), channels=(16, 32, 64), bayes=b),
        True,
        400,
    ),
    Net("resnet8", "ResNet-8", "cifar10", lambda b: models.create("resnet8", bayes=b), False, 300),
    Net("resnet-mp", "ResNet-style, max-pool stem", "cifar10", _resnet_maxpool, True, 300),
]


@dataclass(frozen=True)
class Config:
    label: str
    act_first: bool
    method: str
    correlation: str


CONFIGS = [
    Config("act->pool, tree", True, "clark", "none"),
    Config("pool->act, tree", False, "clark", "none"),
    Config("pool->act, quad", False, "quad", "none"),
    Config("pool->act, corr (meanfield)", False, "clark", "meanfield"),
    Config("pool->act, corr (smooth) [default]", False, "clark", "smooth"),
]
DEFAULT = CONFIGS[-1]


def _body(model: torch.nn.Module) -> torch.nn.Sequential:
    return model.body if isinstance(model, models.ImageClassifier) else model


def _act_first(seq: torch.nn.Sequential) -> torch.nn.Sequential:
    """The same network with every ``MaxPool, f`` pair put back as ``f, MaxPool`` (same keys)."""
    mods = list(seq)
    for i in range(len(mods) - 1):
        if isinstance(mods[i], dnn.MaxPool2d) and is_monotone(mods[i + 1]):
            mods[i], mods[i + 1] = mods[i + 1], mods[i]
    return dnn.set_checks(dnn.Sequential(*mods, pool_first=False), False)


def configure(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    m = copy.deepcopy(model)
    if cfg.act_first:
        if isinstance(m, models.ImageClassifier):
            m.body = _act_first(m.body)
        else:
            m = _act_first(m)
    for mod in m.modules():
        if isinstance(mod, dnn.MaxPool2d):
            mod.method, mod.correlation = cfg.method, cfg.correlation
    return m


# ----------------------------------------------------------------------------- Monte Carlo


class _Tap(torch.nn.Module):
    """Runs a ``Sequential`` and returns every top-level layer's output, flattened per example."""

    def __init__(self, seq: torch.nn.Sequential) -> None:
        super().__init__()
        self.seq = seq

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for mod in self.seq:
            x = mod(x)
            outs.append(x.flatten(1))
        return tuple(outs)


def mc_moments(
    bayes: torch.nn.Module,
    point: torch.nn.Module,
    x: torch.Tensor,
    samples: int,
    chunk: int = 50,
    groups: int = 10,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """Mean and variance of every top-level layer's output of ``point`` over weights from
    ``q`` (the variational posterior of ``bayes``), over ``samples`` whole-network draws.

    Returns the per-layer ``(mean, var)`` (each ``(B, D_l)``, float64) and the batch-means
    standard errors ``(se_mean, se_var)`` of the last layer's mean and variance (``(B, D)``):
    chunk ``i`` of the draws goes to group ``i % groups``, and the standard error is the spread
    of the group means (group variances) over ``sqrt(groups)``, scaled by ``sqrt(n_group / S)``
    for unequal groups' average size (no Gaussian assumption on the logits)."""
    seq_b, seq_p = _body(bayes), _body(point)
    g = torch.Generator().manual_seed(0)
    draws = {}
    for prefix, mod in seq_b.named_modules():
        if isinstance(mod, BayesLayer) and mod.bayes:
            pre = f"seq.{prefix}." if prefix else "seq."
            draws[pre + "weight_mu"] = (mod.weight_mu.detach(), mod.weight_var.detach().sqrt())
            if mod.bias_mu is not None:
                draws[pre + "bias_mu"] = (mod.bias_mu.detach(), mod.bias_var.detach().sqrt())
    tap = _Tap(seq_p)
    fixed = {f"seq.{k}": v for k, v in models.point_state_dict(seq_b).items()}
    fixed = {k: v for k, v in fixed.items() if k not in draws}
    s1: list[torch.Tensor] | None = None
    s2: list[torch.Tensor] = []
    n_chunks = math.ceil(samples / chunk)
    groups = max(2, min(groups, n_chunks))
    g1: list[torch.Tensor | float] = [0.0] * groups  # per group: sum, sum of squares, count (last layer)
    g2: list[torch.Tensor | float] = [0.0] * groups
    gn = [0] * groups
    with torch.no_grad():
        for i, start in enumerate(range(0, samples, chunk)):
            n = min(chunk, samples - start)
            batch = {k: mu + sd * torch.randn((n, *mu.shape), generator=g) for k, (mu, sd) in draws.items()}
            outs = torch.vmap(lambda b: torch.func.functional_call(tap, {**fixed, **b}, (x,)))(batch)
            outs = [o.double() for o in outs]
            if s1 is None:
                s1, s2 = [o.sum(0) for o in outs], [(o * o).sum(0) for o in outs]
            else:
                for j, o in enumerate(outs):
                    s1[j] += o.sum(0)
                    s2[j] += (o * o).sum(0)
            last = outs[-1]
            g1[i % groups] = g1[i % groups] + last.sum(0)
            g2[i % groups] = g2[i % groups] + (last * last).sum(0)
            gn[i % groups] += n
    res = []
    for a, b in zip(s1, s2):
        m = a / samples
        res.append((m, ((b / samples - m * m) * samples / (samples - 1)).clamp_min(0.0)))
    gm = torch.stack([a / k for a, k in zip(g1, gn)])
    gv = torch.stack([(b / k - (a / k) ** 2) * k / (k - 1) for a, b, k in zip(g1, g2, gn)])
    scale = math.sqrt(statistics.mean(gn) / samples)  # a group's SE -> the pooled estimate's SE
    se = (gm.std(0) * scale, gv.std(0) * scale)
    return res, se


def layer_moments(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Moment-propagated outputs of every top-level layer (forward hooks: the container's
    window-correlation plumbing runs as in a normal forward)."""
    outs: list = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o)) for m in _body(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    res = []
    for o in outs:
        g = df.as_gaussian(o)
        res.append((g.mean.flatten(1).double(), g.var.flatten(1).double()))
    return res


def errors(
    mean: torch.Tensor,
    var: torch.Tensor,
    mc_m: torch.Tensor,
    mc_v: torch.Tensor,
    se: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Median/max over outputs of the mean error (MC sds) and relative variance error; with the
    MC standard errors ``se = (se_mean, se_var)`` also their medians (``mc_se_mean`` in MC sds,
    ``mc_se_var`` relative to the MC variance)."""
    keys = ("mean_err_median", "mean_err_max", "var_err_median", "var_err_max", "var_ratio_median")
    keep = mc_v > 1e-9 * float(mc_v.max())  # outputs that are random at all (not a ReLU's dead 0)
    if not bool(keep.any()):  # a deterministic layer (e.g. Flatten of the input)
        return dict.fromkeys(keys + (("mc_se_mean", "mc_se_var") if se else ()), float("nan"))
    em = ((mean - mc_m).abs() / mc_v.sqrt())[keep]
    ev = ((var - mc_v).abs() / mc_v)[keep]
    ratio = (var / mc_v)[keep]
    res = {
        "mean_err_median": float(em.median()),
        "mean_err_max": float(em.max()),
        "var_err_median": float(ev.median()),
        "var_err_max": float(ev.max()),
        "var_ratio_median": float(ratio.median()),
    }
    if se is not None:
        res["mc_se_mean"] = float((se[0] / mc_v.sqrt())[keep].median())
        res["mc_se_var"] = float((se[1] / mc_v)[keep].median())
    return res


def step_time(models_: dict[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict:
    def step(m: torch.nn.Module) -> None:
        m.zero_grad(set_to_none=True)
        out = m(x)
        loss = df.losses.categorical_nll(out, y) + df.nn.kl(m) / 50_000
        loss.backward()

    times: dict[str, list[float]] = {k: [] for k in models_}
    for r in range(repeats + 1):  # one warm-up round (allocator, first-call overheads)
        for k, m in models_.items():
            t0 = time.perf_counter()
            step(m)
            if r >= 1:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


# ----------------------------------------------------------------------------- data / training


def load(dataset: str):
    return load_mnist() if dataset == "mnist" else load_cifar10()


def train_steps(net: Net, args) -> int:
    return 20 if args.quick else max(1, round(args.train_scale * net.train_steps))


def train(net: Net, model: torch.nn.Module, data, workdir: Path, args) -> None:
    """BP training on a training subset (20k images, 2k with ``--quick``), cached in ``workdir``
    under a name that carries the network, the step count and the subset size."""
    n = 2_000 if args.quick else 20_000
    steps = train_steps(net, args)
    path = workdir / f"{net.key}_{steps}steps_{n}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
        return
    x, y = data.normalize(data.x_train[:n]), data.y_train[:n]
    batch = 128
    epochs = max(1, math.ceil(steps * batch / n))
    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=2e-3, progress=False, seed=0)
    model.train()
    fit(model, df.losses.categorical_nll, (x, y), cfg)
    model.eval()
    torch.save(model.state_dict(), path)


# ----------------------------------------------------------------------------- part 1 + 3


def run_network(net: Net, args, workdir: Path, cache: dict) -> dict:
    data = load(net.dataset)
    x = data.normalize(data.x_test[: args.images])
    xb, yb = data.normalize(data.x_train[:64]), data.y_train[:64]
    torch.manual_seed(0)
    model = net.build(True)
    dnn.set_checks(model, False)
    point = dnn.set_checks(net.build(False), False)
    out: dict = {"network": net.name, "dataset": net.dataset, "states": {}}
    for state in ("init", "trained"):
        steps = f"|{train_steps(net, args)}steps" if state == "trained" else ""
        key = f"{net.name}|{state}{steps}|{args.samples}|{args.images}|{args.mc_groups}"
        if key in cache:
            out["states"][state] = cache[key]
            print(f"[cached] {key}", flush=True)
            continue
        if state == "trained":
            train(net, model, data, workdir, args)
        model.eval()
        t0 = time.time()
        mc, se = mc_moments(model, point, x, args.samples, groups=args.mc_groups)
        rows = []
        configs = CONFIGS if net.has_pool else [DEFAULT]
        built = {c.label: configure(model, c).eval() for c in configs}
        for c in configs:
            lm = layer_moments(built[c.label], x)
            rows.append({"config": c.label, **errors(*lm[-1], *mc[-1], se=se)})
        lm = layer_moments(built[DEFAULT.label], x)
        layers = [
            {"layer": _layer_name(mod), **errors(m, v, mm, mv)}
            for mod, (m, v), (mm, mv) in zip(_body(built[DEFAULT.label]), lm, mc)
        ]
        times = {}
        if net.has_pool and state == "init":  # the cost does not depend on the weights' values
            for m in built.values():
                m.train()
            t = step_time(built, xb, yb, 3 if args.quick else args.time_repeats)
            base = t[CONFIGS[0].label]
            times = {k: v / base for k, v in t.items()}
        res = {"rows": rows, "layers": layers, "time_ratio": times, "seconds": time.time() - t0}
        out["states"][state] = res
        cache[key] = res
        print(f"{key}: {rows[-1]}  ({res['seconds']:.0f} s)", flush=True)
    return out


# ----------------------------------------------------------------------------- part 2: window rules


def _windows(m: torch.Tensor, v: torch.Tensor, n: int, g: torch.Generator):
    """``n`` random 2x2 windows of the maps as ``(1, n, 2, 2)`` tensors."""
    b, c = m.shape[:2]
    mw = F.unfold(m, 2, stride=2).reshape(b, c, 4, -1).permute(0, 1, 3, 2).reshape(-1, 4)
    vw = F.unfold(v, 2, stride=2).reshape(b, c, 4, -1).permute(0, 1, 3, 2).reshape(-1, 4)
    keep = vw.min(1).values > 1e-10
    mw, vw = mw[keep], vw[keep]
    idx = torch.randperm(mw.shape[0], generator=g)[:n]
    return mw[idx].reshape(1, -1, 2, 2).double(), vw[idx].reshape(1, -1, 2, 2).double()


def pool_input(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments entering the first max pool (pre-activations: the rewritten order)."""
    pool = next(m for m in model.modules() if isinstance(m, dnn.MaxPool2d))
    got: list = []
    h = pool.register_forward_hook(lambda _m, i, _o: got.append(i[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return got[0].mean, got[0].var


WINDOW_RULES = {
    "clark tree": lambda m, v: rules.max_pool2d_clark(m, v, (2, 2), (2, 2)),
    "quad": lambda m, v: rules.max_pool2d_quad(m, v, (2, 2), (2, 2)),
    "lse T=0.1 (paper)": lambda m, v: rules.max_pool2d_lse(m, v, (2, 2), (2, 2), temperature=0.1),
}


def window_accuracy(regimes: dict, n_mc: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for regime, (m, v) in regimes.items():
        n = m.shape[1]
        mc_m = torch.empty(n, dtype=torch.float64)
        mc_v, mcr_m, mcr_v = torch.empty_like(mc_m), torch.empty_like(mc_m), torch.empty_like(mc_m)
        for s in range(0, n, 32):
            sl = slice(s, s + 32)
            xs = m[0, sl] + v[0, sl].sqrt() * torch.randn(
                n_mc, *m[0, sl].shape, dtype=torch.float64, generator=g
            )
            y = xs.amax((-2, -1))
            yr = torch.relu(y)  # maxpool(relu(x)) = relu(maxpool(x))
            mc_m[sl], mc_v[sl] = y.mean(0), y.var(0)
            mcr_m[sl], mcr_v[sl] = yr.mean(0), yr.var(0)
        for name, fn in WINDOW_RULES.items():
            mean, var = fn(m, v)
            rows.append({"regime": regime, "rule": name, **errors(mean.flatten(), var.flatten(), mc_m, mc_v)})
        # the rewrite on the same windows: rectify then pool, or pool then rectify
        for name, (mean, var) in {
            "relu -> clark tree": rules.max_pool2d_clark(*rules.relu(m, v), (2, 2), (2, 2)),
            "clark tree -> relu": rules.relu(*rules.max_pool2d_clark(m, v, (2, 2), (2, 2))),
            "quad -> relu": rules.relu(*rules.max_pool2d_quad(m, v, (2, 2), (2, 2))),
        }.items():
            rows.append(
                {"regime": regime, "rule": name, **errors(mean.flatten(), var.flatten(), mcr_m, mcr_v)}
            )
    return rows


def adversarial(n: int, g: torch.Generator) -> dict:
    d = torch.float64
    m = torch.randn(1, n, 2, 2, dtype=d, generator=g)
    return {
        "similar variances": (m, torch.rand(1, n, 2, 2, dtype=d, generator=g) + 0.5),
        "variances spread 100x": (m, 10 ** (2 * torch.rand(1, n, 2, 2, dtype=d, generator=g) - 1)),
        "variances spread 1e4x": (m, 10 ** (4 * torch.rand(1, n, 2, 2, dtype=d, generator=g) - 2)),
        "means far apart": (4 * m, torch.rand(1, n, 2, 2, dtype=d, generator=g) * 0.5 + 0.05),
    }


def rule_cost(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    shape = (64, 32, 16, 16)
    m = torch.randn(shape, requires_grad=True)
    v = (torch.rand(shape) + 0.1).requires_grad_(True)
    offsets = rules.window_offsets((2, 2))
    corr = (torch.rand(shape[0], 4, *shape[1:]) * 0.9).requires_grad_(True)
    wm = (torch.randn(32, 32, 3, 3) * 0.1).requires_grad_(True)
    wv = (torch.rand(32, 32, 3, 3) * 0.01).requires_grad_(True)
    bv = (torch.rand(32) * 0.01).requires_grad_(True)
    fns = {
        "point F.max_pool2d": lambda: F.max_pool2d(m, 2).sum(),
        "clark tree": lambda: sum(t.sum() for t in rules.max_pool2d_clark(m, v, (2, 2), (2, 2))),
        "clark + correlations (given)": lambda: sum(
            t.sum() for t in rules.max_pool2d_clark_corr(m, v, corr, offsets, (2, 2), (2, 2))
        ),
        "quad": lambda: sum(t.sum() for t in rules.max_pool2d_quad(m, v, (2, 2), (2, 2))),
        "lse T=0.1": lambda: sum(
            t.sum() for t in rules.max_pool2d_lse(m, v, (2, 2), (2, 2), temperature=0.1)
        ),
        "conv 3x3 32->32 moments (reference)": lambda: sum(
            t.sum() for t in rules.conv(m, v, wm, wv, None, bv, padding=(1, 1))
        ),
        "conv window covariances (smooth)": lambda: rules.conv2d_window_cov(
            m, v, wm, wv, bv, offsets, padding=(1, 1)
        ).sum(),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 2):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn().backward()
            if r >= 2:
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["point F.max_pool2d"])
    return [
        {"rule": k, "ms": 1e3 * statistics.median(t), "ratio": statistics.median(t) / base}
        for k, t in times.items()
    ]


# ----------------------------------------------------------------------------- report


def _fmt_row(r: dict) -> str:
    return (
        f"{r['mean_err_median']:.3f} / {r['mean_err_max']:.2f} | "
        f"{100 * r['var_err_median']:.1f}% / {100 * r['var_err_max']:.0f}% | {r['var_ratio_median']:.2f}"
    )


def report(res: dict, cmd: str, args) -> str:
    se_m, se_v = 1 / math.sqrt(args.samples), math.sqrt(2 / args.samples)
    md = [
        "# Moment accuracy against weight-sampling Monte Carlo",
        "",
        "Command:",
        "",
        f"    {cmd}",
        "",
        f"(1 thread; {res['seconds'] / 60:.0f} min in the last invocation, parts cached by earlier "
        "invocations excluded). Code: `benchmarks/bench_moments.py` (its docstring defines every column).",
        "",
        f"Configuration: {args.images} test images per network, {args.samples} whole-network weight draws, "
        f"training {args.train_scale:g} x the default steps (MLP, LeNet-5, VGG-style: "
        f"{round(args.train_scale * 400)} steps; ResNets: {round(args.train_scale * 300)} steps; batch 128, "
        f"20k training images), {args.windows} windows x {args.window_mc} draws in part 2. "
        "The script's default (4000 draws, full training) is the full configuration.",
        "",
        f"MC resolution: nominal (1 SE, Gaussian logits) {se_m:.3f} sd for the mean, {100 * se_v:.1f}% for "
        f"the variance; the `MC SE` columns are the empirical batch-means standard errors ({args.mc_groups} "
        "groups), median over the logits. An exact BP would still show median errors of about 0.67 SE "
        "(the median of a half-normal). Errors per logit: mean error in MC sds, relative variance error; "
        "`median / max` over the logits. `var ratio`: median of BP variance / MC variance "
        "(< 1: BP under-estimates). Step time: one training step (batch 64) relative to `act->pool, tree`, "
        "measured at init.",
        "",
        "## Whole networks",
        "",
        "| network | state | max pooling | mean err (sd) med / max | var err med / max | var ratio | "
        "MC SE mean / var | step time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for net in res["networks"]:
        for state, st in net["states"].items():
            for r in st["rows"]:
                t = st["time_ratio"].get(r["config"])
                tt = f"{t:.2f}x" if t is not None else "-"
                label = r["config"] if len(st["rows"]) > 1 else "(no max pooling)"
                mcse = f"{r['mc_se_mean']:.3f} / {100 * r['mc_se_var']:.1f}%"
                md.append(f"| {net['network']} | {state} | {label} | {_fmt_row(r)} | {mcse} | {tt} |")
    md += ["", "### Target", ""]
    md.append(
        f"Issue 11: whole-network moment accuracy of Conv-ReLU-MaxPool stacks, median variance error "
        f"<= {100 * TARGET_VAR:.0f}%, mean error <= {TARGET_MEAN} output sd (median over logits). "
        "The pooled networks, before/after the pool-first rewrite and without/with window correlations "
        "(median over the logits +- the median MC SE of one logit):"
    )
    md += [
        "",
        "| network | state | max pooling | median var err | median mean err (sd) | target |",
        "|---|---|---|---|---|---|",
    ]
    for net in res["networks"]:
        for state, st in net["states"].items():
            if len(st["rows"]) < 2:
                continue
            for r in st["rows"]:
                ok_v, ok_m = r["var_err_median"] <= TARGET_VAR, r["mean_err_median"] <= TARGET_MEAN
                verdict = (
                    "met"
                    if ok_v and ok_m
                    else "var NOT met"
                    if ok_m
                    else "mean NOT met"
                    if ok_v
                    else "NOT met"
                )
                md.append(
                    f"| {net['network']} | {state} | {r['config']} | "
                    f"{100 * r['var_err_median']:.1f}% +- {100 * r['mc_se_var']:.1f}% | "
                    f"{r['mean_err_median']:.3f} +- {r['mc_se_mean']:.3f} | {verdict} |"
                )
    md += ["", "With the default max pooling:", ""]
    for net in res["networks"]:
        if not any(len(st["rows"]) > 1 for st in net["states"].values()):
            continue
        for state, st in net["states"].items():
            r = st["rows"][-1]
            ok_v, ok_m = r["var_err_median"] <= TARGET_VAR, r["mean_err_median"] <= TARGET_MEAN
            md.append(
                f"- {net['network']}, {state}: variance {100 * r['var_err_median']:.1f}% "
                f"({'met' if ok_v else 'NOT met'}), mean {r['mean_err_median']:.3f} sd "
                f"({'met' if ok_m else 'NOT met'})."
            )
    md += ["", "## Where the error comes from (default pooling, layer by layer)", ""]
    md.append(
        "Moments after every top-level layer against MC of the same truncated network "
        "(ResNet blocks are one row each; ReLU and Flatten rows are left out: given a Gaussian "
        "input the ReLU rule is exact, and their relative variance errors on nearly dead units "
        "are meaningless)."
    )
    for net in res["networks"]:
        for state, st in net["states"].items():
            if not st["layers"]:
                continue
            md += [
                "",
                f"**{net['network']}, {state}**",
                "",
                "| # | layer | mean err med / max | var err med / max | var ratio |",
                "|---|---|---|---|---|",
            ]
            for i, lay in enumerate(st["layers"]):
                if lay["layer"] not in ("ReLU", "Flatten"):  # exact maps of the row above
                    md.append(f"| {i} | {lay['layer']} | {_fmt_row(lay)} |")
    md += [
        "",
        "## Max-pool rules on 2x2 windows of independent Gaussians",
        "",
        f"{args.windows} windows per regime, {args.window_mc} MC samples each. Realistic windows: the "
        "Gaussian pre-activation windows entering the first max pool of the VGG-style network "
        "(CIFAR-10 test images). `relu -> ...` rows: MC of `maxpool(relu(x))`, the rewrite's two orders.",
        "",
        "| windows | rule | mean err (sd) med / max | var err med / max | var ratio |",
        "|---|---|---|---|---|",
    ]
    for r in res["windows"]:
        md.append(f"| {r['regime']} | {r['rule']} | {_fmt_row(r)} |")
    md += ["", "| rule (fwd+bwd, (64, 32, 16, 16) map) | ms | x point max_pool2d |", "|---|---|---|"]
    md += [f"| {r['rule']} | {r['ms']:.2f} | {r['ratio']:.1f}x |" for r in res["cost"]]
    return "\n".join(md) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=4000, help="whole-network MC weight draws")
    ap.add_argument("--images", type=int, default=16, help="test images per network")
    ap.add_argument("--windows", type=int, default=256, help="windows per regime (part 2)")
    ap.add_argument("--window-mc", type=int, default=200_000, help="MC samples per window (part 2)")
    ap.add_argument("--mc-groups", type=int, default=10, help="groups of draws for the batch-means MC SE")
    ap.add_argument(
        "--train-scale", type=float, default=1.0, help="fraction of each network's training steps (400/300)"
    )
    ap.add_argument(
        "--nets",
        default=",".join(n.key for n in NETS),
        help="comma-separated networks: " + ", ".join(n.key for n in NETS),
    )
    ap.add_argument("--time-repeats", type=int, default=5, help="repeats of the step-time measurement")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sample sizes, short training")
    ap.add_argument("--workdir", default=str(Path(__file__).resolve().parents[1] / "runs" / "bench_moments"))
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.quick:
        args.samples, args.images, args.windows, args.window_mc = 200, 4, 32, 20_000
    known = {n.key: n for n in NETS}
    wanted = [k.strip() for k in args.nets.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in known]
    if unknown or not wanted:
        ap.error(f"--nets: unknown network(s) {unknown or wanted}; choose from {', '.join(known)}")
    if args.samples < 2 or args.images < 1 or args.train_scale <= 0 or args.mc_groups < 2:
        ap.error("--samples >= 2, --images >= 1, --train-scale > 0 and --mc-groups >= 2 are required")
    torch.set_num_threads(1)
    out = Path(args.out)
    for f in ("moments.json", "moments.md"):  # outputs writable before any work (nothing created)
        check_writable(out / f, option="--out")
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cache_file = workdir / "cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    load_mnist(), load_cifar10()  # fail early when the data are missing
    t0 = time.time()
    nets = []
    for key in wanted:
        nets.append(run_network(known[key], args, workdir, cache))
        cache_file.write_text(json.dumps(cache))
    # part 2: windows of the VGG-style net, initialised and trained
    g = torch.Generator().manual_seed(0)
    vgg = NETS[2]
    data = load_cifar10()
    x = data.normalize(data.x_test[:8])
    regimes = {}
    torch.manual_seed(0)
    model = dnn.set_checks(vgg.build(True), False).eval()
    regimes["realistic (VGG-style, init)"] = _windows(*pool_input(model, x), args.windows, g)
    train(vgg, model, data, workdir, args)
    regimes["realistic (VGG-style, trained)"] = _windows(*pool_input(model.eval(), x), args.windows, g)
    regimes.update(adversarial(args.windows, g))
    windows = window_accuracy(regimes, args.window_mc)
    cost = rule_cost(3 if args.quick else 15)
    res = {"networks": nets, "windows": windows, "cost": cost, "seconds": time.time() - t0}
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    niceness = os.nice(0)  # the niceness this process runs at (0: not niced)
    cmd = env + (f"nice -n {niceness} " if niceness else "") + "python " + " ".join(sys.argv)
    res["command"] = cmd
    (out / "moments.json").write_text(json.dumps(res, indent=2))
    md = report(res, cmd, args)
    (out / "moments.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
