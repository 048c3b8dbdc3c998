"""Gradient noise and convergence of BP versus weight-sampling methods (the paper's Figure 1).

Two experiments on one model description (a :mod:`dualflow.methods` builder):

* :func:`run_gradvar` -- at one fixed parameter point, the variance of the mini-batch
  gradient of each method's objective with respect to the weight means, as a function of
  the batch size (Figure 1 a, c);
* :func:`run_convergence` -- training and validation loss per epoch of every method from the
  same initialisation, with the same optimizer and learning rate, over several seeds
  (Figure 1 b, d).

Gradient variance (the quantity reported)
-----------------------------------------
Let ``theta`` be the vector of all weight *means* of the network (``weight_mu`` and
``bias_mu`` of every :class:`~dualflow.nn.BayesLayer`; for ``vanilla`` the point weights,
set to those means), ``P`` its length. For a method ``M`` and batch size ``B`` one *draw* is

    ``g = grad_theta [ (1/B) sum_{n in batch} J_M(x_n, y_n) + KL(q || p) / N ]``

where the batch is ``B`` distinct examples drawn uniformly without replacement from the ``N``
training examples, and ``J_M`` is the method's data term (:meth:`dualflow.methods.Method.loss`):
the probit / Gaussian marginal NLL of the propagated moments for ``bp`` (deterministic given
the batch), the NLL of one sampled forward pass with fresh weight noise for ``reparam``
(one weight draw shared by the batch), ``local-reparam`` and ``flipout``, and the NLL of the
point network for ``vanilla`` (which has no KL). Draws are independent (fresh batch and fresh
weight noise each time). The reported number is the per-coordinate variance averaged over
the weights, as in Wen et al. (2018, Flipout, Figure 1):

    ``V(M, B) = (1/P) sum_{p=1}^{P} Var[g_p]``

i.e. the trace of the gradient covariance divided by ``P``. ``per_layer`` entries average
over the coordinates of one parameter tensor only.

Estimator and confidence interval: ``K = groups * draws`` independent draws are split into
``groups`` replicate groups of ``draws`` each. In group ``k`` the unbiased sample variance of
every coordinate (divisor ``draws - 1``) is averaged over the coordinates, giving ``V_k``,
an unbiased estimate of ``V``; the ``V_k`` are independent and identically distributed. The
estimate is their mean, and the interval is the Student-t interval
``mean +- t_{groups-1, (1+level)/2} * sd(V_k) / sqrt(groups)``. Mini-batches are common
random numbers: at a given ``B`` every method sees the same sequence of batches, so
differences between methods are estimated more precisely than each value alone.

For plain mini-batch noise (``bp``, ``vanilla``) ``Var[g_p] = s_p^2 (N - B) / (B (N - 1))``
with ``s_p^2`` the population variance of the per-example gradients: slope -1 on a log-log
plot up to the finite-population factor, which changes the slope between ``B = 16`` and
``B = 1024`` by less than 0.005 when ``N = 60000``. For the linear-Gaussian model the weight
noise terms are derived in :func:`linear_gaussian_variance`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

import dualflow.methods as dm
from dualflow.nn.base import BayesLayer
from dualflow.train import TrainConfig

__all__ = [
    "DEFAULT_METHODS",
    "MINIBATCH_ONLY",
    "STYLE",
    "fit_floor",
    "fit_loglog",
    "gradient_variance",
    "image_builder",
    "linear_gaussian_variance",
    "load_image_task",
    "mean_parameters",
    "paired_excess",
    "plot_convergence",
    "plot_gradvar",
    "point_summary",
    "prepare_methods",
    "run_convergence",
    "run_gradvar",
    "summarize_fits",
    "t_quantile",
    "warmup",
    "write_csv",
]

#: the methods of Figure 1, in plotting order
DEFAULT_METHODS: tuple[str, ...] = ("bp", "reparam", "local-reparam", "flipout", "vanilla")
#: methods whose gradient noise is mini-batch noise only
MINIBATCH_ONLY: tuple[str, ...] = ("bp", "vanilla")


# ============================================================================ statistics


def t_quantile(q: float, df: int) -> float:
    """Quantile ``q`` (in (0.5, 1)) of Student's t distribution with ``df`` degrees of freedom.

    Bisection on the CDF ``1/2 + int_0^t pdf``, the integral by composite Simpson's rule
    (accurate to ~1e-9 here, which is plenty; no SciPy needed at run time).
    """
    if not 0.5 < q < 1.0:
        raise ValueError(f"q must lie in (0.5, 1), got {q}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    nu = float(df)
    logc = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)

    def pdf(x: float) -> float:
        return math.exp(logc - (nu + 1) / 2 * math.log1p(x * x / nu))

    def cdf(t: float, n: int = 2000) -> float:
        h = t / n
        s = pdf(0.0) + pdf(t) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
        return 0.5 + s * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return 0.5 * (lo + hi)


def _t_interval(values: Sequence[float], level: float) -> tuple[float, float, float, float]:
    """``(mean, low, high, standard error)`` of the Student-t interval of i.i.d. ``values``."""
    g = len(values)
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(g)
    half = t_quantile(0.5 + level / 2, g - 1) * se
    return mean, mean - half, mean + half, se


def fit_loglog(
    batch_sizes: Sequence[float], variances: Sequence[float], std_errors: Sequence[float]
) -> dict[str, float]:
    """Weighted least-squares line ``log V = a + s log B``: slope ``s`` and its standard error.

    Weights ``1 / se(log V)^2`` with ``se(log V) = se(V) / V`` (delta method). ``slope_se``
    is the usual WLS standard error scaled by ``sqrt(chi2 / dof)`` when that exceeds 1 (the
    line does not fit within the errors, e.g. a curve that levels off), so a bent curve does
    not get a falsely precise slope; ``chi2_dof`` reports the fit quality.
    """
    xs = [math.log(b) for b in batch_sizes]
    ys = [math.log(v) for v in variances]
    ws = [(v / max(se, 1e-300)) ** 2 for v, se in zip(variances, std_errors)]
    sw = sum(ws)
    xm = sum(w * x for w, x in zip(ws, xs)) / sw
    ym = sum(w * y for w, y in zip(ws, ys)) / sw
    sxx = sum(w * (x - xm) ** 2 for w, x in zip(ws, xs))
    slope = sum(w * (x - xm) * (y - ym) for w, x, y in zip(ws, xs, ys)) / sxx
    icpt = ym - slope * xm
    dof = len(xs) - 2
    chi2 = sum(w * (y - icpt - slope * x) ** 2 for w, x, y in zip(ws, xs, ys))
    chi2_dof = chi2 / dof if dof > 0 else float("nan")
    se = math.sqrt(1.0 / sxx) * (math.sqrt(max(chi2_dof, 1.0)) if dof > 0 else 1.0)
    return {"slope": slope, "slope_se": se, "intercept": icpt, "chi2_dof": chi2_dof}


def fit_floor(
    batch_sizes: Sequence[float], variances: Sequence[float], std_errors: Sequence[float]
) -> dict[str, float]:
    """Weighted least squares ``V(B) = a / B + c`` with ``a, c >= 0``.

    ``c`` is the part of the variance that does not fall with the batch size (the "floor" a
    curve levels off to); ``floor_share`` is ``c / V(B_max)``, the share of the fitted variance
    at the largest batch size that the floor makes up (0 for pure ``1/B`` noise).
    """
    ws = [1.0 / max(se, 1e-300) ** 2 for se in std_errors]
    us = [1.0 / b for b in batch_sizes]

    def solve(with_c: bool) -> tuple[float, float]:
        if not with_c:
            a = sum(w * u * v for w, u, v in zip(ws, us, variances)) / sum(w * u * u for w, u in zip(ws, us))
            return max(a, 0.0), 0.0
        s_uu = sum(w * u * u for w, u in zip(ws, us))
        s_u = sum(w * u for w, u in zip(ws, us))
        s_1 = sum(ws)
        s_uv = sum(w * u * v for w, u, v in zip(ws, us, variances))
        s_v = sum(w * v for w, v in zip(ws, variances))
        det = s_uu * s_1 - s_u * s_u
        a = (s_uv * s_1 - s_u * s_v) / det
        c = (s_uu * s_v - s_u * s_uv) / det
        if c < 0:
            return solve(False)
        if a < 0:
            return 0.0, s_v / s_1
        return a, c

    a, c = solve(True)
    bmax = max(batch_sizes)
    fitted = a / bmax + c
    return {"a": a, "floor": c, "floor_share": c / fitted if fitted > 0 else float("nan")}


# ============================================================================ the estimator


def mean_parameters(net: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``[(name, parameter)]`` of the weight and bias means of every :class:`BayesLayer` of
    ``net`` (point layers included: their weights are the means), in module order."""
    out = []
    for prefix, mod in net.named_modules():
        if isinstance(mod, BayesLayer):
            pre = f"{prefix}." if prefix else ""
            out.append((pre + "weight_mu", mod.weight_mu))
            if mod.bias_mu is not None:
                out.append((pre + "bias_mu", mod.bias_mu))
    if not out:
        raise ValueError("the network has no dualflow BayesLayer (Linear / Conv*d) parameters")
    return out


def gradient_variance(
    objective: Callable[[Any, Tensor], Tensor],
    params: Sequence[tuple[str, Tensor]],
    sample_batch: Callable[[], tuple[Any, Tensor]],
    *,
    draws: int = 20,
    groups: int = 10,
    level: float = 0.95,
) -> dict[str, Any]:
    """Estimate ``V = (1/P) sum_p Var[g_p]`` of the stochastic gradient ``g`` of ``objective``
    with respect to ``params`` (see the module docstring for the estimator and its interval).

    Args:
        objective: ``objective(x, y) -> scalar``; any randomness inside (weight noise) must be
            fresh at every call.
        params: ``[(name, tensor)]``, the coordinates ``g`` is taken over.
        sample_batch: returns an independent mini-batch ``(x, y)`` at every call.
        draws: draws per replicate group (>= 2).
        groups: independent replicate groups (>= 2).
        level: confidence level of the interval.

    Returns:
        ``{"variance", "ci_low", "ci_high", "se", "group_values", "per_layer": {name:
        {"variance", "ci_low", "ci_high"}}, "draws_total", "mean_grad_sq"}``; ``mean_grad_sq``
        is ``(1/P) ||mean of all draws||^2`` (the squared gradient signal plus ``V / K``).
    """
    if draws < 2 or groups < 2:
        raise ValueError(f"need draws >= 2 and groups >= 2, got draws={draws}, groups={groups}")
    names = [n for n, _ in params]
    tensors = [p for _, p in params]
    sizes = [p.numel() for p in tensors]
    total = sum(sizes)
    group_vals: list[float] = []
    layer_vals: dict[str, list[float]] = {n: [] for n in names}
    grand: Tensor | None = None
    for _ in range(groups):
        shift = s1 = s2 = None
        for _ in range(draws):
            x, y = sample_batch()
            grads = torch.autograd.grad(objective(x, y), tensors, allow_unused=True)
            g = torch.cat(
                [(torch.zeros_like(p) if d is None else d).reshape(-1) for d, p in zip(grads, tensors)]
            ).double()
            if shift is None:
                shift, s1, s2 = g, torch.zeros_like(g), torch.zeros_like(g)
                grand = torch.zeros_like(g) if grand is None else grand
            d = g - shift
            s1 += d
            s2 += d * d
            grand += g
        var = (s2 - s1 * s1 / draws) / (draws - 1)
        group_vals.append(float(var.sum()) / total)
        for n, part in zip(names, var.split(sizes)):
            layer_vals[n].append(float(part.mean()))
    mean, lo, hi, se = _t_interval(group_vals, level)
    per_layer = {}
    for n in names:
        m_, l_, h_, _ = _t_interval(layer_vals[n], level)
        per_layer[n] = {"variance": m_, "ci_low": l_, "ci_high": h_}
    k = draws * groups
    return {
        "variance": mean,
        "ci_low": lo,
        "ci_high": hi,
        "se": se,
        "group_values": group_vals,
        "per_layer": per_layer,
        "draws_total": k,
        "mean_grad_sq": float(((grand / k) ** 2).sum()) / total,
    }


# ============================================================================ closed form


def linear_gaussian_variance(
    x: Tensor,
    y: Tensor,
    mu: Tensor,
    sigma2: Tensor,
    noise_var: float,
    batch_size: int,
    method: str,
) -> float:
    """Exact ``V = (1/P) sum_p Var[g_p]`` for a linear-Gaussian model (test oracle).

    Model: one :class:`~dualflow.nn.Linear` layer ``f(x) = w^T x`` with one output,
    ``w ~ q = N(mu, diag sigma2)`` (a bias is included by appending a constant 1 to ``x``
    and its mean and variance to ``mu`` and ``sigma2``), Gaussian likelihood with fixed noise
    variance ``tau^2 = noise_var``; data ``x`` ``(N, P)``, ``y`` ``(N,)``; mini-batches of
    ``B`` distinct examples drawn uniformly without replacement. The KL term's gradient is
    deterministic and adds nothing to the variance.

    Mini-batch noise. For a per-example quantity ``a_n`` the batch mean has variance
    ``Var_pop(a) (N - B) / (B (N - 1))`` (finite-population sampling), where ``Var_pop`` is
    the population variance (divisor ``N``). Write ``r_n = y_n - mu^T x_n``,
    ``v_n = sum_j sigma2_j x_nj^2`` (the output variance under ``q``) and ``C = mean_n x_n x_n^T``.

    * ``vanilla`` (point weights ``mu``): ``g = -(1/B) sum r_n x_n / tau^2``, so
      ``Var[g_p] = Var_pop(r x_p / tau^2) (N-B)/(B(N-1))``.
    * ``bp`` (marginal NLL ``1/2 log(2 pi s_n) + r_n^2 / (2 s_n)``, ``s_n = v_n + tau^2``,
      where ``s_n`` does not depend on ``mu``): per-example gradient ``-r_n x_n / s_n``;
      ``Var[g_p] = Var_pop(r x_p / s) (N-B)/(B(N-1))``.

    Weight noise (``reparam``, ``local-reparam``, ``flipout``; data term ``(y - f)^2 / (2 tau^2)``
    of one sampled output ``f_n = mu^T x_n + e_n``, ``d f_n / d mu = x_n``): the gradient is
    ``g = g_vanilla + (1/(B tau^2)) sum_n e_n x_n`` with ``E[e | batch] = 0``, so by the law
    of total variance ``Var[g_p] = Var[g_vanilla,p] + E_batch Var(g_p | batch)``:

    * ``reparam``: one draw ``w = mu + sigma * eps`` for the batch, ``e_n = x_n^T (sigma * eps)``,
      so ``(1/B) sum e_n x_n = C_hat (sigma * eps)`` with the batch second moment
      ``C_hat = (1/B) sum x_n x_n^T``; ``Var(g_p | batch) = sum_j C_hat_pj^2 sigma2_j / tau^4`` and
      ``E C_hat_pj^2 = C_pj^2 + Var_pop(x_p x_j) (N-B)/(B(N-1))``. The term ``C_pj^2`` does not
      fall with ``B``: the variance levels off at ``sum_j C_pj^2 sigma2_j / tau^4``.
    * ``local-reparam``: ``e_n = sqrt(v_n) zeta_n`` with independent ``zeta_n ~ N(0, 1)``:
      ``Var(g_p | batch) = (1/(B^2 tau^4)) sum_n v_n x_np^2``, whose batch expectation is
      ``mean_n(v_n x_np^2) / (B tau^4)`` (with or without replacement): falls as ``1/B``.
    * ``flipout``: ``e_n = s_n sum_j r_nj x_nj delta_j`` (+ independent bias noise) with
      ``delta = sigma * eps`` shared, and independent random signs ``s_n`` (output) and
      ``r_nj`` (input). ``E[e_n e_m] = 0`` for ``n != m`` (``E s_n s_m = 0``) and
      ``E[e_n^2] = sum_j x_nj^2 sigma2_j = v_n``: the same conditional variance as local
      reparameterisation. (For one linear layer flipout and local reparameterisation give
      the same per-coordinate variance; they differ in deeper networks.)

    Returns:
        ``V`` averaged over the ``P`` coordinates of ``x``.
    """
    x = x.double()
    y = y.double().reshape(-1)
    mu = mu.double().reshape(-1)
    s2 = sigma2.double().reshape(-1)
    n, _ = x.shape
    b = int(batch_size)
    if not 1 <= b <= n:
        raise ValueError(f"batch_size must lie in [1, {n}], got {b}")
    fpc = (n - b) / (b * (n - 1)) if n > 1 else 0.0
    tau2 = float(noise_var)
    r = y - x @ mu
    v = (x * x) @ s2

    def minibatch(a: Tensor) -> Tensor:  # Var of the batch mean of per-example rows a (N, P)
        return a.var(0, unbiased=False) * fpc

    if method == "vanilla":
        out = minibatch(-r[:, None] * x / tau2)
    elif method == "bp":
        out = minibatch(-r[:, None] * x / (v + tau2)[:, None])
    elif method in ("reparam", "local-reparam", "flipout"):
        out = minibatch(-r[:, None] * x / tau2)
        if method == "reparam":
            c = x.T @ x / n  # (P, P)
            xx = x[:, :, None] * x[:, None, :]  # (N, P, P)
            ec2 = c * c + xx.var(0, unbiased=False) * fpc
            out = out + ec2 @ s2 / tau2**2
        else:
            out = out + ((v[:, None] * x * x).mean(0)) / (b * tau2**2)
    else:
        raise ValueError(f"no closed form for method {method!r}")
    return float(out.mean())


# ============================================================================ experiment pieces


def warmup(
    build: dm.Builder,
    data: tuple[Tensor, Tensor],
    *,
    task: str = "classification",
    epochs: float = 1.0,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    method_kw: dict[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Initialise the Bayesian network (seed ``seed``) and train it by BP for ``epochs``
    (a fraction trains on the first part of a shuffled epoch) on ``mean J + KL / N`` with
    ``N`` the size of ``data``; returns its ``state_dict``."""
    torch.manual_seed(seed)
    m = dm.create("bp", build, task=task, **(method_kw or {}))
    x, y = data
    if epochs > 0:
        n = int(y.shape[0])
        whole, frac = int(epochs), epochs - int(epochs)
        cfg = dict(
            batch_size=batch_size, lr=lr, seed=seed, progress=False, schedule="constant", kl_weight=1.0 / n
        )
        if whole:
            m.fit((x, y), TrainConfig(epochs=whole, **cfg), device=device)
        if frac > 0:
            g = torch.Generator().manual_seed(seed + 7919)
            idx = torch.randperm(n, generator=g)[: max(batch_size, int(frac * n))]
            m.fit((x[idx], y[idx]), TrainConfig(epochs=1, **cfg), device=device)
    return {k: v.detach().clone() for k, v in m.net.state_dict().items()}


def prepare_methods(
    build: dm.Builder,
    state: dict[str, Tensor],
    methods: Sequence[str],
    *,
    task: str = "classification",
    device: str | torch.device = "cpu",
    method_kw: dict[str, Any] | None = None,
) -> dict[str, dm.Method]:
    """One :class:`~dualflow.methods.Method` per name, all at the parameter point ``state``
    (the Bayesian network's ``state_dict``); point methods get the weight means."""
    from dualflow.models import point_state_dict

    out = {}
    for name in methods:
        m = dm.create(name, build, task=task, **(method_kw or {}))
        if m.traits.gaussian:
            m.net.load_state_dict(state)
        else:
            ref = build(True)
            ref.load_state_dict(state)
            m.net.load_state_dict(point_state_dict(ref))
        out[name] = m.to(device)
    return out


def _objective(m: dm.Method, n_train: int) -> Callable[[Any, Tensor], Tensor]:
    """The training step's objective ``J + KL / N`` (the one loop's, :meth:`Method.objective`)."""
    step = m.objective(1.0 / n_train)

    def obj(x: Any, y: Tensor) -> Tensor:
        return step(x, y).loss

    return obj


def run_gradvar(
    methods: dict[str, dm.Method],
    data: tuple[Tensor, Tensor],
    batch_sizes: Sequence[int],
    *,
    draws: int = 20,
    groups: int = 10,
    level: float = 0.95,
    seed: int = 0,
    transform: Callable[[Tensor], Tensor] | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Gradient variance of every method at every batch size (the methods share their
    parameter point, see :func:`prepare_methods`).

    ``data = (x, y)`` is the training set (``N`` examples; ``KL / N`` in the objective);
    ``transform`` maps a batch of stored inputs to network inputs (e.g. uint8 images to
    normalised floats). Returns one record per (method, batch size):
    ``{"method", "batch_size", "variance", "ci_low", "ci_high", "se", "seconds", ...}``.
    """
    x_all, y_all = data
    n = int(y_all.shape[0])
    records = []
    for b in batch_sizes:
        if not 1 <= b <= n:
            raise ValueError(f"batch size {b} must lie in [1, {n}]")
        for mi, (name, m) in enumerate(methods.items()):
            m.train()
            g = torch.Generator().manual_seed(seed * 1_000_003 + int(b))  # same batches for all methods
            torch.manual_seed(seed * 7_919 + 104_729 * int(b) + mi)  # weight noise

            def sample(g: torch.Generator = g, b: int = int(b)) -> tuple[Any, Tensor]:
                idx = torch.randperm(n, generator=g)[:b]
                xb = x_all[idx]
                xb = transform(xb) if transform is not None else xb
                return xb.to(device), y_all[idx].to(device)

            t0 = time.perf_counter()
            est = gradient_variance(
                _objective(m, n),
                mean_parameters(m.net),
                sample,
                draws=draws,
                groups=groups,
                level=level,
            )
            rec = {"method": name, "batch_size": int(b), **est, "seconds": time.perf_counter() - t0}
            records.append(rec)
            if log is not None:
                log(
                    f"{name:>14} B={b:<5} V={rec['variance']:.4g} "
                    f"[{rec['ci_low']:.4g}, {rec['ci_high']:.4g}]  {rec['seconds']:.1f}s"
                )
    return records


def paired_excess(rec: dict[str, Any], ref: dict[str, Any], level: float = 0.95) -> dict[str, float]:
    """Excess variance ``V_M - V_ref`` of one (method, batch size) record over the reference's
    record at the same batch size, with a paired Student-t interval over the replicate groups.

    :func:`run_gradvar` gives every method the same sequence of mini-batches at a given batch
    size, so group ``k`` of both records saw the same batches: the differences of the group
    values are i.i.d. and cancel most of the mini-batch noise shared by both methods.
    ``excess_share`` is ``(V_M - V_ref) / V_M``: the share of the method's gradient variance
    that the reference (mini-batch noise only) does not have.
    """
    d = [a - b for a, b in zip(rec["group_values"], ref["group_values"])]
    if len(d) < 2 or len(rec["group_values"]) != len(ref["group_values"]):
        raise ValueError("paired_excess needs records with the same number (>= 2) of groups")
    mean, lo, hi, _ = _t_interval(d, level)
    return {
        "batch_size": rec["batch_size"],
        "excess": mean,
        "ci_low": lo,
        "ci_high": hi,
        "excess_share": mean / rec["variance"],
    }


def summarize_fits(records: Sequence[dict[str, Any]], level: float = 0.95) -> dict[str, dict[str, Any]]:
    """Per method: log-log slope (:func:`fit_loglog`), floor fit (:func:`fit_floor`), the
    ratio of its variance to the mini-batch-only reference (``vanilla``, else ``bp``) at the
    smallest and largest batch size, and the paired excess over the reference at every batch
    size (:func:`paired_excess`, key ``excess``)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    ref_name = "vanilla" if "vanilla" in by else ("bp" if "bp" in by else None)
    ref = {r["batch_size"]: r["variance"] for r in by.get(ref_name, [])} if ref_name else {}
    out = {}
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r["batch_size"])
        bs = [r["batch_size"] for r in rs]
        vs = [r["variance"] for r in rs]
        ses = [r["se"] for r in rs]
        s: dict[str, float] = {}
        if len(rs) >= 2:
            s.update(fit_loglog(bs, vs, ses))
            s.update(fit_floor(bs, vs, ses))
        if ref:
            s["reference"] = ref_name
            s["ratio_to_reference_min_B"] = vs[0] / ref[bs[0]] if bs[0] in ref else float("nan")
            s["ratio_to_reference_max_B"] = vs[-1] / ref[bs[-1]] if bs[-1] in ref else float("nan")
            if name != ref_name:
                refs = {r["batch_size"]: r for r in by[ref_name]}
                s["excess"] = [
                    paired_excess(r, refs[r["batch_size"]], level)
                    for r in rs
                    if r["batch_size"] in refs and "group_values" in r
                ]
        out[name] = s
    return out


def point_summary(state: dict[str, Tensor]) -> dict[str, float]:
    """Size of the weight noise at a parameter point: mean ``sigma^2``, mean ``mu^2`` and their
    ratio over all weights (biases excluded)."""
    mu2 = s2 = 0.0
    count = 0
    for k, v in state.items():
        if k.endswith("weight_mu"):
            rho = state.get(k[: -len("mu")] + "rho")
            mu2 += float((v.double() ** 2).sum())
            if rho is not None:
                s2 += float(torch.nn.functional.softplus(rho.double()).pow(2).sum())
            count += v.numel()
    return {"mean_mu2": mu2 / count, "mean_sigma2": s2 / count, "sigma2_over_mu2": s2 / max(mu2, 1e-300)}


# ============================================================================ training curves


def run_convergence(
    build: dm.Builder,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    methods: Sequence[str],
    seeds: Sequence[int],
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    schedule: str = "constant",
    eval_samples: int = 8,
    train_eval: int = 5000,
    transform: Callable[[Tensor], Tensor] | None = None,
    task: str = "classification",
    kl_n: int | None = None,
    device: str | torch.device = "cpu",
    method_kw: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every method from the same initialisation and record the loss per epoch.

    For each seed the Bayesian network is initialised once (``torch.manual_seed(seed)``);
    every Bayesian method starts from that state and ``vanilla`` from its weight means
    (:func:`prepare_methods`). All use ``optimizer`` with learning rate ``lr``, the same
    ``batch_size``, ``schedule`` and data order (``TrainConfig.seed = seed``); the objective is
    ``mean J + KL / N`` (:func:`dualflow.train.fit`) with ``N = kl_n`` if given, else the number
    of training examples (``kl_n`` larger than the subset trained on keeps the balance of
    data term and KL of the full data set in a reduced run).

    Records per (method, seed, epoch):

    * ``train_objective``: the objective ``mean J + KL / N`` and ``train_data_term`` its data
      term ``mean J``, averaged over the epoch's mini-batches as training ran (for the sampling
      methods with their sampling noise); ``kl``: ``KL(q || p)`` (0 for ``vanilla``);
    * ``train_nll``, ``val_nll``, ``val_accuracy`` (classification): predictive NLL of each
      method's own predictive at the end of the epoch, on the first ``train_eval`` training
      examples and on ``val`` (:meth:`~dualflow.methods.Method.evaluate`: moments for ``bp``,
      ``eval_samples`` weight samples for the sampling methods, the point network for
      ``vanilla``);
    * ``seconds``: training time of the epoch.
    """
    xtr, ytr = train
    xva, yva = val

    def prep(x: Tensor) -> Tensor:
        if transform is None:
            return x
        return torch.cat([transform(x[i : i + 4096]) for i in range(0, x.shape[0], 4096)])

    xtr_f = prep(xtr)
    xva_f = prep(xva).to(device)
    yva_d = yva.to(device)
    k = min(int(train_eval), xtr_f.shape[0])
    xte_f, yte_d = xtr_f[:k].to(device), ytr[:k].to(device)
    records = []
    for seed in seeds:
        torch.manual_seed(seed)
        init = {k_: v.detach().clone() for k_, v in build(True).state_dict().items()}
        for name, m in prepare_methods(build, init, methods, task=task, method_kw=method_kw).items():
            m.samples = int(eval_samples)

            def ev(mm: dm.Method) -> dict[str, float]:
                tr = mm.evaluate(xte_f, yte_d)
                va = mm.evaluate(xva_f, yva_d)
                out = {"train_nll": tr["nll"], "val_nll": va["nll"]}
                for key in ("accuracy", "rmse"):
                    if key in va:
                        out[f"val_{key}"] = va[key]
                        out[f"train_{key}"] = tr[key]
                return out

            cfg = TrainConfig(
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                optimizer=optimizer,
                schedule=schedule,
                seed=seed,
                progress=False,
                kl_weight=None if kl_n is None else 1.0 / kl_n,
            )
            t0 = time.perf_counter()
            hist = m.fit((xtr_f, ytr), cfg, eval_fn=ev, device=device)
            for e in hist.epochs:
                rec = {
                    "method": name,
                    "seed": int(seed),
                    "epoch": int(e["epoch"]),
                    "train_objective": e["loss"],
                    "train_data_term": e["nll"],
                    "kl": e["kl"],
                    "seconds": e["seconds"],
                }
                rec.update({k_: e[k_] for k_ in e if k_.startswith(("train_", "val_")) and k_ not in rec})
                records.append(rec)
            if log is not None:
                last = records[-1]
                log(
                    f"{name:>14} seed={seed} epochs={epochs} train J={last['train_data_term']:.4f} "
                    f"val_nll={last['val_nll']:.4f} {time.perf_counter() - t0:.1f}s"
                )
    return records


# ============================================================================ data, models, plots


def load_image_task(
    dataset: str, data_dir: str | None = None, train_subset: int | None = None
) -> tuple[Any, Callable[[Tensor], Tensor]]:
    """``(ImageData limited to the first train_subset training examples, normalising transform)``."""
    from dualflow.experiments.data.images import load_dataset

    data = load_dataset(dataset, data_dir).limit_train(train_subset)
    return data, data.normalize


def image_builder(
    arch: str, data: Any, *, width: float | None = None, depth: int | None = None, **kw: Any
) -> dm.Builder:
    """:func:`dualflow.models.builder` for ``data`` (classes, channels, image size), normalisation-free
    (the same network for every method). ``width``: hidden units (``mlp``) or channel
    multiplier (``vgg16``); ``depth``: hidden layers (``mlp``)."""
    from dualflow import models

    opts = dict(kw)
    if width is not None:
        opts["width"] = int(width) if arch == "mlp" else float(width)
    if depth is not None:
        opts["depth"] = int(depth)
    return models.builder(
        arch,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        normalization="none",
        **opts,
    )


#: colours and labels of the methods in the figures
STYLE: dict[str, tuple[str, str]] = {
    "bp": ("tab:red", "BP"),
    "reparam": ("tab:blue", "reparam. (R)"),
    "local-reparam": ("tab:green", "local reparam. (L)"),
    "flipout": ("tab:purple", "flipout (F)"),
    "vanilla": ("black", "vanilla (point network)"),
}


def _style(name: str) -> tuple[str | None, str]:
    return STYLE.get(name, (None, name))


def plot_gradvar(
    records: Sequence[dict[str, Any]], fits: dict[str, dict[str, float]], path: str, title: str = ""
) -> None:
    """Left: log-log plot of the gradient variance against the batch size, with the intervals.
    Right (when ``fits`` has paired excesses, :func:`summarize_fits`): ``V / V_ref`` with the
    paired interval ``1 + excess / V_ref``, i.e. how much variance each method adds to (or
    removes from) the mini-batch noise of the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_ratio = any(f.get("excess") for f in fits.values())
    fig, axes = plt.subplots(1, 2 if has_ratio else 1, figsize=(11, 4.4) if has_ratio else (5.6, 4.4))
    ax = axes[0] if has_ratio else axes
    names = list(dict.fromkeys(r["method"] for r in records))
    for name in names:
        rs = sorted((r for r in records if r["method"] == name), key=lambda r: r["batch_size"])
        b = [r["batch_size"] for r in rs]
        v = [r["variance"] for r in rs]
        err = [[r["variance"] - r["ci_low"] for r in rs], [r["ci_high"] - r["variance"] for r in rs]]
        color, label = _style(name)
        if name in fits and "slope" in fits[name]:
            label += f"  (slope {fits[name]['slope']:.2f})"
        ls = "--" if name == "vanilla" else "-"
        ax.errorbar(b, v, yerr=err, fmt="o" + ls, color=color, label=label, ms=4, capsize=2, lw=1.3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("gradient variance (mean over weights)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if has_ratio:
        ax2 = axes[1]
        ref_name = next(f["reference"] for f in fits.values() if f.get("excess"))
        ref = {r["batch_size"]: r["variance"] for r in records if r["method"] == ref_name}
        for name in names:
            ex = fits.get(name, {}).get("excess")
            color, label = _style(name)
            if name == ref_name:
                ax2.axhline(1.0, color=color, ls="--", lw=1.2, label=label)
                continue
            if not ex:
                continue
            b = [e["batch_size"] for e in ex]
            rat = [1 + e["excess"] / ref[e["batch_size"]] for e in ex]
            err = [
                [(e["excess"] - e["ci_low"]) / ref[e["batch_size"]] for e in ex],
                [(e["ci_high"] - e["excess"]) / ref[e["batch_size"]] for e in ex],
            ]
            ax2.errorbar(b, rat, yerr=err, fmt="o-", color=color, label=label, ms=4, capsize=2, lw=1.3)
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("batch size B")
        ax2.set_ylabel(f"V / V_{ref_name} (paired interval)")
        ax2.set_title(f"variance relative to {ref_name} (same mini-batches)", fontsize=10)
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_convergence(records: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """Training and validation loss per epoch: mean over seeds with a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [
        ("train_data_term", "training loss: mean J over the epoch"),
        ("val_nll", "validation NLL (each method's predictive)"),
        ("train_objective", "training objective mean J + KL/N"),
    ]
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
    names = list(dict.fromkeys(r["method"] for r in records))
    for ax, (key, ylabel) in zip(axes, panels):
        lo = min((r[key] for r in records if key in r), default=1.0)
        hi = max((r[key] for r in records if key in r), default=1.0)
        for name in names:
            rs = [r for r in records if r["method"] == name and key in r]
            if key == "train_objective" and all(r.get("kl", 0.0) == 0.0 for r in rs):
                continue  # a point network has no KL: its objective is the data term
            seeds = sorted({r["seed"] for r in rs})
            epochs = sorted({r["epoch"] for r in rs})
            vals = np.full((len(seeds), len(epochs)), np.nan)
            for r in rs:
                vals[seeds.index(r["seed"]), epochs.index(r["epoch"])] = r[key]
            color, label = _style(name)
            mean = np.nanmean(vals, 0)
            ax.plot(epochs, mean, "-o", ms=3, color=color, label=f"{label} ({len(seeds)} seeds)")
            if len(seeds) > 1:
                ax.fill_between(epochs, np.nanmin(vals, 0), np.nanmax(vals, 0), color=color, alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key != "train_objective" and lo > 0 and hi / lo > 3:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(rows: Sequence[dict[str, Any]], path: str, columns: Sequence[str]) -> None:
    """Rows as CSV with the given columns (missing values left empty)."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
