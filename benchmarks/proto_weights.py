"""Prototypes of the weight-side costs of a BP training step, timed against the library.

Self-contained prototype layers (:class:`ProtoLinear`, :class:`ProtoConv2d`) and optimizer
(:class:`ProtoAdam`) compute the same moments as ``dualflow.nn`` (``rules.linear`` /
``rules.conv``, the library's ReLU and pooling modules, the same loss) and differ only in
how the weights' variances are held and updated. Candidates, each alone and combined:

* ``param``: ``softplus`` (the library: ``sigma = softplus(rho)``, ``var = sigma^2``),
  ``logvar`` (``var = exp(lv)``: one op instead of two, and a cheaper KL), ``var`` (the
  variance itself is the parameter the forward reads, no op in the step; the optimizer runs
  Adam on ``log var`` and writes ``var = exp(log var)`` back: the same optimisation path as
  ``logvar``).
* ``kl``: ``graph`` (``+ KL/N`` in the loss, differentiated by autograd) or ``opt`` (not in
  the graph; the optimizer adds its closed-form gradient ``mu / (s0 N)`` and
  ``d/d param [0.5 (var/s0 - log var)] / N`` before the Adam update: the same gradient).
* ``varmap``: ``cat`` (the library: one map over ``[v, m^2]`` and ``[mu^2 + var, var]``,
  both concatenated every step) or ``split`` (two maps accumulated in place, no
  concatenation; the same sums in another order).
* ``flat``: every ``mu`` in one flat buffer and every variance parameter in another (layers
  hold views), gradients accumulated into flat buffers, so that the KL gradient, the
  log-space bookkeeping and fused Adam run once over one tensor per group.

Timing: every variant, the library's BP step and a plain torch point step of one
(architecture, batch) case run in one process, interleaved round by round; medians. Memory:
as ``bench_step.py`` (live state + peak of the step's allocations). Checks: every variant's
forward moments equal the library's for the same ``(mu, var)``; with the library's
parameterisation, the update direction (the gradient Adam receives) equals the library's;
the path of ``logvar`` vs ``softplus`` is compared by training both on MNIST.

Usage::

    python benchmarks/proto_weights.py [--quick] [--threads 1]

writes ``benchmarks/results/proto_weights.json`` and ``proto_weights.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dualflow as df
from dualflow import rules
from dualflow.gaussian import Gaussian
from dualflow.nn import base as dnn_base

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import cnn_builder, mlp_builder
from bench_step import peak_step_bytes, step_torch

RESULTS = Path(__file__).resolve().parent / "results"
N_TRAIN = 50_000
LR = 1e-3


# ----------------------------------------------------------------------------- layers
class _ProtoLayer(nn.Module):
    """Mean-field Gaussian weights with a configurable variance parameter."""

    kind: str = "linear"

    def __init__(self, w_shape: tuple[int, ...], fan_in: int, param: str, varmap: str, **conv_kw) -> None:
        super().__init__()
        self.param, self.varmap, self.conv_kw = param, varmap, conv_kw
        self.prior_var = 2.0 / fan_in  # the library's default (gain^2 / fan_in)
        self.weight_mu = nn.Parameter(torch.zeros(w_shape))
        self.bias_mu = nn.Parameter(torch.zeros(w_shape[0]))
        self.weight_p = nn.Parameter(torch.zeros(w_shape))  # rho | log var | var
        self.bias_p = nn.Parameter(torch.zeros(w_shape[0]))

    def set_from(self, lib: dnn_base.BayesLayer) -> None:
        """Copy ``(mu, var)`` of a library layer."""
        with torch.no_grad():
            self.weight_mu.copy_(lib.weight_mu)
            self.bias_mu.copy_(lib.bias_mu)
            for p, rho in ((self.weight_p, lib.weight_rho), (self.bias_p, lib.bias_rho)):
                var = F.softplus(rho).square()
                p.copy_({"softplus": rho, "logvar": var.log(), "var": var}[self.param])

    def variances(self) -> tuple[Tensor, Tensor]:
        if self.param == "softplus":
            return F.softplus(self.weight_p).square(), F.softplus(self.bias_p).square()
        if self.param == "logvar":
            return self.weight_p.exp(), self.bias_p.exp()
        return self.weight_p, self.bias_p

    def kl(self) -> Tensor:
        wv, bv = self.variances()
        if self.param == "softplus":  # the library's formula
            return dnn_base.kl_normal(self.weight_mu, wv, self.prior_var) + dnn_base.kl_normal(
                self.bias_mu, bv, self.prior_var
            )
        # 0.5 sum(var/s0 + mu^2/s0 - 1 - log var + log s0), with log var read directly
        total = self.weight_mu.new_zeros(())
        for mu, var, p in ((self.weight_mu, wv, self.weight_p), (self.bias_mu, bv, self.bias_p)):
            logv = p if self.param == "logvar" else var.log()
            s0 = self.prior_var
            const = mu.numel() * (math.log(s0) - 1.0)
            total = total + 0.5 * ((var + mu * mu).sum() / s0 - logv.sum() + const)
        return total

    def _map(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if self.kind == "linear":
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, **self.conv_kw)

    def forward(self, x):
        m, v = (x.mean, x.var) if isinstance(x, Gaussian) else (x, None)
        wv, bv = self.variances()
        if self.varmap == "cat":
            if self.kind == "linear":
                return Gaussian(*rules.linear(m, v, self.weight_mu, wv, self.bias_mu, bv))
            return Gaussian(*rules.conv(m, v, self.weight_mu, wv, self.bias_mu, bv, **self.conv_kw))
        # split: A_{mu^2 + var}(v) + A_var(m^2) + b_var as two maps, no concatenation
        mean = self._map(m, self.weight_mu, self.bias_mu)
        var = self._map(m * m, wv, bv)
        if v is not None:
            var = var + self._map(v, self.weight_mu * self.weight_mu + wv, None)
        return Gaussian(mean, var)


class ProtoLinear(_ProtoLayer):
    kind = "linear"

    def __init__(self, n_in: int, n_out: int, param: str, varmap: str) -> None:
        super().__init__((n_out, n_in), n_in, param, varmap)


class ProtoConv2d(_ProtoLayer):
    kind = "conv"

    def __init__(self, c_in: int, c_out: int, param: str, varmap: str) -> None:
        super().__init__((c_out, c_in, 3, 3), 9 * c_in, param, varmap, padding=1)


def proto_net(arch: str, param: str, varmap: str) -> nn.Module:
    dn = df.nn
    if arch == "mlp":
        mods = [dn.Flatten(), ProtoLinear(784, 400, param, varmap), dn.ReLU()]
        mods += [ProtoLinear(400, 400, param, varmap), dn.ReLU(), ProtoLinear(400, 10, param, varmap)]
        return nn.Sequential(*mods)
    return nn.Sequential(
        ProtoConv2d(3, 32, param, varmap),
        dn.ReLU(),
        dn.MaxPool2d(2),
        ProtoConv2d(32, 64, param, varmap),
        dn.ReLU(),
        dn.MaxPool2d(2),
        ProtoConv2d(64, 64, param, varmap),
        dn.ReLU(),
        dn.GlobalAvgPool2d(),
        ProtoLinear(64, 10, param, varmap),
    )


def proto_layers(net: nn.Module) -> list[_ProtoLayer]:
    return [m for m in net.modules() if isinstance(m, _ProtoLayer)]


# ----------------------------------------------------------------------------- optimizer
class ProtoAdam:
    """Fused Adam over ``mu`` and the variance parameters, with the optional closed-form KL
    gradient and the log-space update of a stored variance.

    ``param="var"``: Adam runs on ``log var`` (kept here), with ``g_logvar = g_var * var``;
    after the update ``var = exp(log var)`` is written into the layer's parameter.
    ``flat``: the layers' parameters are views of one flat buffer per group, and so are
    their gradients (accumulated in place by autograd), so every pass runs once per group.
    """

    def __init__(self, net: nn.Module, param: str, kl: str, flat: bool) -> None:
        self.layers = proto_layers(net)
        self.param, self.kl, self.flat = param, kl, flat
        mus = [t for lay in self.layers for t in (lay.weight_mu, lay.bias_mu)]
        ps = [t for lay in self.layers for t in (lay.weight_p, lay.bias_p)]
        self.s0 = [lay.prior_var for lay in self.layers for _ in range(2)]
        if flat:
            self.mus, self.ps = [self._flatten(mus)], [self._flatten(ps)]
            # one prior variance per element (layers differ): a flat tensor
            self.s0_inv = [torch.cat([torch.full((t.numel(),), 1.0 / s) for t, s in zip(mus, self.s0)])]
        else:
            self.mus, self.ps = mus, ps
            self.s0_inv = [1.0 / s for s in self.s0]
        # the tensors Adam updates: mu, and rho | log var | log var (for stored var)
        self.logv = [p.detach().log() for p in self.ps] if param == "var" else None
        targets = self.mus + (self.logv if self.logv is not None else self.ps)
        self.adam = torch.optim.Adam(targets, lr=LR, fused=True)
        self.targets = targets

    @staticmethod
    def _flatten(params: list[nn.Parameter]) -> Tensor:
        """Move ``params`` into one flat buffer (their data become views) with a flat grad."""
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        grad = torch.zeros_like(flat)
        i = 0
        for p in params:
            n = p.numel()
            p.data = flat[i : i + n].view_as(p)
            p.grad = grad[i : i + n].view_as(p)
            i += n
        flat.grad = grad
        return flat

    def zero_grad(self) -> None:
        if self.flat:
            for t in self.mus + self.ps:
                t.grad.zero_()  # one pass; autograd then accumulates into the views
        else:
            for lay in self.layers:
                for p in lay.parameters():
                    p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads_mu = [t.grad for t in self.mus]
        grads_p = [t.grad for t in self.ps]
        if self.kl == "opt":
            # d(KL/N)/d mu = mu / (s0 N)
            for g, mu, c in zip(grads_mu, self.mus, self.s0_inv):
                if isinstance(c, Tensor):
                    g.addcmul_(mu, c, value=1.0 / N_TRAIN)
                else:
                    g.add_(mu, alpha=c / N_TRAIN)
        if self.param == "softplus" and self.kl == "opt":
            # d/drho 0.5 (s^2/s0 - log s^2) / N = (s/s0 - 1/s) sigmoid(rho) / N, s = softplus(rho)
            for g, rho, c in zip(grads_p, self.ps, self.s0_inv):
                s = F.softplus(rho)
                t = s.mul(c) if isinstance(c, Tensor) else s * c
                g.add_(t.sub_(s.reciprocal_()).mul_(torch.sigmoid(rho)), alpha=1.0 / N_TRAIN)
        elif self.param == "logvar" and self.kl == "opt":
            # d/dlv 0.5 (exp(lv)/s0 - lv) / N = 0.5 (var/s0 - 1) / N
            for g, lv, c in zip(grads_p, self.ps, self.s0_inv):
                var = lv.exp()
                g.add_(var.mul_(c), alpha=0.5 / N_TRAIN)
                g.sub_(0.5 / N_TRAIN)
        elif self.param == "var":
            assert self.logv is not None
            for g, var, lv, c in zip(grads_p, self.ps, self.logv, self.s0_inv):
                gl = g.mul(var)  # chain rule to log var
                if self.kl == "opt":
                    gl.add_(var * c, alpha=0.5 / N_TRAIN).sub_(0.5 / N_TRAIN)
                lv.grad = gl
        self.adam.step()
        if self.param == "var":
            assert self.logv is not None
            for var, lv in zip(self.ps, self.logv):
                torch.exp(lv, out=var.data)


# ----------------------------------------------------------------------------- steps
Step = tuple[Callable[[], None], nn.Module, object]


def step_library(arch: str, x, y) -> Step:
    model = (mlp_builder if arch == "mlp" else cnn_builder)(True)
    df.nn.set_checks(model, False)
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = df.losses.categorical_nll(model(x), y) + df.nn.kl(model) / N_TRAIN
        loss.backward()
        opt.step()

    return step, model, opt


def step_proto(arch: str, x, y, param: str, kl: str, varmap: str, flat: bool, lib=None) -> Step:
    net = proto_net(arch, param, varmap)
    lib = lib if lib is not None else (mlp_builder if arch == "mlp" else cnn_builder)(True)
    lib_layers = [m for m in lib.modules() if isinstance(m, dnn_base.BayesLayer)]
    for p_lay, l_lay in zip(proto_layers(net), lib_layers):
        p_lay.set_from(l_lay)
    opt = ProtoAdam(net, param, kl, flat)

    def step() -> None:
        opt.zero_grad()
        loss = df.losses.categorical_nll(net(x), y)
        if kl == "graph":
            loss = loss + sum(lay.kl() for lay in proto_layers(net)) / N_TRAIN
        loss.backward()
        opt.step()

    return step, net, opt


class _OptView:
    """``peak_step_bytes`` reads ``opt.state`` and ``opt.param_groups``: expose ProtoAdam's."""

    def __init__(self, popt: ProtoAdam) -> None:
        extra = list(popt.logv or []) + [t.grad for t in popt.mus + popt.ps if popt.flat]
        self.state = popt.adam.state
        self.param_groups = [{"params": [], **{f"t{i}": t for i, t in enumerate(extra)}}]


VARIANTS: dict[str, dict] = {
    "replica (softplus, kl graph, cat)": dict(param="softplus", kl="graph", varmap="cat", flat=False),
    "logvar": dict(param="logvar", kl="graph", varmap="cat", flat=False),
    "stored var (log-space Adam)": dict(param="var", kl="graph", varmap="cat", flat=False),
    "kl in optimizer": dict(param="softplus", kl="opt", varmap="cat", flat=False),
    "split variance map": dict(param="softplus", kl="graph", varmap="split", flat=False),
    "flat buffers": dict(param="softplus", kl="graph", varmap="cat", flat=True),
    "logvar + kl in opt": dict(param="logvar", kl="opt", varmap="cat", flat=False),
    "stored var + kl in opt": dict(param="var", kl="opt", varmap="cat", flat=False),
    "stored var + kl in opt + split": dict(param="var", kl="opt", varmap="split", flat=False),
    "all: stored var + kl in opt + split + flat": dict(param="var", kl="opt", varmap="split", flat=True),
    "logvar + kl in opt + split + flat": dict(param="logvar", kl="opt", varmap="split", flat=True),
}


def bench(arch: str, batch: int, rounds: int, variants: list[str]) -> list[dict]:
    shape = (1, 28, 28) if arch == "mlp" else (3, 32, 32)
    torch.manual_seed(0)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    steps: dict[str, tuple] = {"torch": step_torch(arch, x, y), "library bp": step_library(arch, x, y)}
    for name in variants:
        torch.manual_seed(0)
        steps[name] = step_proto(arch, x, y, **VARIANTS[name])
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds + 2):
        for k, (fn, _, _) in steps.items():
            t0 = time.perf_counter()
            fn()
            if r >= 2:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {}
    for k, (fn, net, opt) in steps.items():
        mem[k] = peak_step_bytes(fn, net, _OptView(opt) if isinstance(opt, ProtoAdam) else opt)
    return [
        {
            "arch": arch,
            "batch": batch,
            "variant": k,
            "rounds": rounds,
            "step_ms": 1e3 * med[k],
            "ratio_to_torch": med[k] / med["torch"],
            "ratio_to_library": med[k] / med["library bp"],
            "mem_ratio_to_torch": mem[k] / mem["torch"],
            "mem_ratio_to_library": mem[k] / mem["library bp"],
        }
        for k in steps
    ]


# ----------------------------------------------------------------------------- checks
def check_numbers(arch: str) -> list[dict]:
    """Forward moments vs the library (same mu, var); the gradient Adam receives vs the
    library's (same parameterisation), float64."""
    torch.manual_seed(1)
    shape = (16, 1, 28, 28) if arch == "mlp" else (8, 3, 32, 32)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 10, (shape[0],))
    lib = (mlp_builder if arch == "mlp" else cnn_builder)(True).double()
    df.nn.set_checks(lib, False)
    ref = lib(x)
    loss = df.losses.categorical_nll(ref, y) + df.nn.kl(lib) / N_TRAIN
    lib_layers = [m for m in lib.modules() if isinstance(m, dnn_base.BayesLayer)]
    g_ref = torch.autograd.grad(loss, [t for m in lib_layers for t in (m.weight_mu, m.weight_rho)])
    rows = []
    for name, cfg in VARIANTS.items():
        net = proto_net(arch, cfg["param"], cfg["varmap"]).double()
        for p_lay, l_lay in zip(proto_layers(net), lib_layers):
            p_lay.set_from(l_lay)
        with torch.no_grad():
            out_ng = net(x)
        out = net(x)
        scale = ref.mean.detach().abs().amax()
        dm = float((out_ng.mean - ref.mean.detach()).abs().amax() / scale)
        dv = float((out_ng.var - ref.var.detach()).abs().amax() / ref.var.detach().abs().amax())
        row = {"arch": arch, "variant": name, "rel_diff_mean": dm, "rel_diff_var": dv}
        if cfg["param"] == "softplus" and not cfg["flat"]:
            opt = ProtoAdam(net, cfg["param"], cfg["kl"], flat=False)
            opt.zero_grad()
            loss = df.losses.categorical_nll(out, y)
            if cfg["kl"] == "graph":
                loss = loss + sum(lay.kl() for lay in proto_layers(net)) / N_TRAIN
            loss.backward()
            with torch.no_grad():
                opt.adam.step = lambda: None  # only the gradient hand-over of step()
                opt.step()
            got = [t.grad for lay in proto_layers(net) for t in (lay.weight_mu, lay.weight_p)]
            diffs = [float((a - b).abs().amax() / b.abs().amax()) for a, b in zip(got, g_ref)]
            row["rel_diff_grad"] = max(diffs)
        rows.append(row)
    return rows


def path_check(steps: int) -> dict:
    """Train the library (softplus) and the logvar prototype from the same (mu, var) on
    MNIST; logvar at the library's lr and at 2x (log var = 2 log sigma ~ 2 rho for small
    sigma, so 2x reproduces the library's steps in log sigma)."""
    root = Path(os.environ.get("DUALFLOW_DATA", "data"))
    f = root / "mnist" / "train.npz"
    if not f.is_file():
        print(f"path check skipped: {f} not found (set DUALFLOW_DATA)", flush=True)
        return {}
    return _path_check(np.load(f), steps)


def _path_check(d, steps: int) -> dict:
    xs = torch.from_numpy(d["x"][:12800]).float().div_(255.0).sub_(0.1307).div_(0.3081).unsqueeze(1)
    ys = torch.from_numpy(d["y"][:12800])
    out: dict[str, list[float]] = {}
    torch.manual_seed(0)
    lib0 = mlp_builder(True)
    configs = {"library (softplus rho), lr": ("lib", 1.0), "logvar, same lr": ("logvar", 1.0)}
    configs["logvar, 2x lr on log var"] = ("logvar", 2.0)
    for name, (kind, mult) in configs.items():
        torch.manual_seed(1)
        if kind == "lib":
            net = mlp_builder(True)
            net.load_state_dict(lib0.state_dict())
            df.nn.set_checks(net, False)
            opt = torch.optim.Adam(net.parameters(), lr=LR, fused=True)
            kl_fn = lambda net=net: df.nn.kl(net)  # noqa: E731
        else:
            net = proto_net("mlp", "logvar", "cat")
            lib_layers = [m for m in lib0.modules() if isinstance(m, dnn_base.BayesLayer)]
            for p_lay, l_lay in zip(proto_layers(net), lib_layers):
                p_lay.set_from(l_lay)
            mus = [p for n, p in net.named_parameters() if n.endswith("_mu")]
            lvs = [p for n, p in net.named_parameters() if n.endswith("_p")]
            opt = torch.optim.Adam([{"params": mus}, {"params": lvs, "lr": LR * mult}], lr=LR, fused=True)
            kl_fn = lambda net=net: sum(lay.kl() for lay in proto_layers(net))  # noqa: E731
        losses = []
        perm = torch.randperm(xs.shape[0], generator=torch.Generator().manual_seed(2))
        for i in range(steps):
            idx = perm[(i * 128) % xs.shape[0] :][:128]
            opt.zero_grad(set_to_none=True)
            nll = df.losses.categorical_nll(net(xs[idx]), ys[idx])
            (nll + kl_fn() / 60_000).backward()
            opt.step()
            losses.append(float(nll))
        with torch.no_grad():
            ev = df.losses.categorical_nll(net(xs[:2000]), ys[:2000])
        out[name] = {"final_train_nll_last50": statistics.mean(losses[-50:]), "nll_first_2000": float(ev)}
    return out


def write_md(path: Path, meta: dict, rows: list[dict], checks: list[dict], path_rows: dict | None) -> None:
    md = [
        "# Weight-side prototypes of the BP step (`benchmarks/proto_weights.py`)",
        "",
        f"Command: `{meta['command']}`; torch {meta['torch']}, CPU, {meta['threads']} thread(s), "
        f"{meta['seconds']:.0f} s. All variants of a case interleaved round by round in one process; "
        "medians. Shared machine: absolute times are noisy, ratios less so.",
    ]
    for arch, batch in dict.fromkeys((r["arch"], r["batch"]) for r in rows):
        sub = [r for r in rows if r["arch"] == arch and r["batch"] == batch]
        md += [
            "",
            f"## {arch.upper()}, batch {batch}",
            "",
            "| variant | ms | time / torch | time / library bp | memory / torch | memory / library bp |",
            "|---|---|---|---|---|---|",
        ]
        for r in sub:
            md.append(
                f"| {r['variant']} | {r['step_ms']:.2f} | {r['ratio_to_torch']:.2f}x | "
                f"{r['ratio_to_library']:.2f}x | {r['mem_ratio_to_torch']:.2f}x | "
                f"{r['mem_ratio_to_library']:.2f}x |"
            )
    md += [
        "",
        "## Numbers (float64): forward moments vs the library for the same (mu, var); the gradient "
        "Adam receives vs the library's (variants with the library's parameterisation)",
        "",
        "| arch | variant | rel. diff mean | rel. diff var | rel. diff gradient |",
        "|---|---|---|---|---|",
    ]
    for c in checks:
        g = c.get("rel_diff_grad")
        md.append(
            f"| {c['arch']} | {c['variant']} | {c['rel_diff_mean']:.1e} | {c['rel_diff_var']:.1e} | "
            f"{'-' if g is None else f'{g:.1e}'} |"
        )
    if path_rows:
        md += [
            "",
            f"## Optimisation path: MLP on 12,800 MNIST images, {meta['path_steps']} Adam steps, batch 128",
            "",
            "| run | train NLL (mean of last 50 steps) | NLL on the first 2,000 images |",
            "|---|---|---|",
        ]
        for k, v in path_rows.items():
            md.append(f"| {k} | {v['final_train_nll_last50']:.4f} | {v['nll_first_2000']:.4f} |")
    md.append("")
    path.write_text("\n".join(md))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--path-steps", type=int, default=400)
    ap.add_argument("--out", default=str(RESULTS / "proto_weights.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    plan = [("mlp", 128, 40), ("mlp", 512, 15), ("cnn", 64, 6)] if not args.quick else [("mlp", 128, 3)]
    variants = list(VARIANTS)
    rows: list[dict] = []
    for arch, batch, rounds in plan:
        t1 = time.perf_counter()
        res = bench(arch, batch, rounds, variants)
        rows += res
        print(f"{arch} B={batch} ({time.perf_counter() - t1:.0f} s):", flush=True)
        for r in res:
            print(f"  {r['variant']:45s} {r['ratio_to_torch']:.2f}x torch  {r['ratio_to_library']:.2f}x lib  "
                  f"mem {r['mem_ratio_to_torch']:.2f}x", flush=True)  # fmt: skip
    checks = check_numbers("mlp") + check_numbers("cnn")
    path_rows = None if args.quick else path_check(args.path_steps)
    meta = {
        "command": "python " + " ".join(["benchmarks/proto_weights.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "threads": args.threads,
        "path_steps": args.path_steps,
        "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "timings": rows, "checks": checks, "path": path_rows}, indent=2))
    write_md(out.with_suffix(".md"), meta, rows, checks, path_rows)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
