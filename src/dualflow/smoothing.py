"""Smoothing by backpropagation: the posterior over hidden activations given the label.

Theorems 1-2 of the paper (docs/maths.md section 4): treat a layer's output moments
``(m_l, v_l)`` as free inputs of the rest of the network, let
``g_m = d log p(y|x) / d m_l`` and ``g_v = d log p(y|x) / d v_l`` (one autodiff pass), then

    m_l|L = m_l + v_l g_m,        v_l|L = v_l + 2 v_l^2 g_v - (v_l g_m)^2.

This is the diagonal (mean-field) form: exact when the rest of the network is
linear-Gaussian *and* the units of layer ``l`` stay independent given the input (e.g. the
last hidden layer before a linear-Gaussian read-out, or element-wise chains); otherwise it
inherits the Gaussian, independent-unit approximations of moment propagation.
:func:`importance_smoothing` gives a Monte Carlo reference for Bayesian networks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dualflow.gaussian import Gaussian, as_gaussian

__all__ = ["LayerMoments", "importance_smoothing", "log_likelihood_fn", "smooth"]


@dataclass
class LayerMoments:
    """Filtering (forward) and smoothing (given ``y``) moments of one module's output."""

    name: str
    filtered: Gaussian
    smoothed: Gaussian


def log_likelihood_fn(
    task: str = "regression", noise_var: float | Tensor | None = None
) -> Callable[[Gaussian, Tensor], Tensor]:
    """Per-example ``log p(y | x)`` from output moments, shape ``(B,)``.

    ``"regression"``: ``log N(y; m_L, v_L + noise_var)`` summed over output dims (the
    paper's marginal likelihood); ``"classification"``: the probit approximation
    ``log softmax(m / sqrt(1 + pi v / 8))_y``.
    """
    if task == "regression":
        if noise_var is None or not float(torch.as_tensor(noise_var).min()) > 0:
            raise ValueError("regression smoothing needs a positive noise_var")

        def ll(out: Gaussian, y: Tensor) -> Tensor:
            y = y.reshape(out.mean.shape)
            s = out.var + torch.as_tensor(noise_var, dtype=out.mean.dtype)
            lp = -0.5 * (math.log(2 * math.pi) + torch.log(s) + (y - out.mean) ** 2 / s)
            return lp.reshape(lp.shape[0], -1).sum(1)

        return ll
    if task == "classification":

        def ll_c(out: Gaussian, y: Tensor) -> Tensor:
            z = out.mean * torch.rsqrt(1.0 + (math.pi / 8.0) * out.var)
            return torch.log_softmax(z, -1).gather(1, y.long().reshape(-1, 1)).squeeze(1)

        return ll_c
    raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")


def _default_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(model, torch.nn.Sequential):
        return list(model.named_children())
    return [(n, m) for n, m in model.named_modules() if n and not list(m.children())]


def smooth(
    model: torch.nn.Module,
    x: Tensor | Gaussian,
    y: Tensor,
    task: str = "regression",
    noise_var: float | Tensor | None = None,
    modules: Sequence[tuple[str, torch.nn.Module]] | None = None,
    log_likelihood: Callable[[Gaussian, Tensor], Tensor] | None = None,
) -> list[LayerMoments]:
    """Filtering and smoothing moments of every layer from one forward and one backward pass.

    Args:
        model: a ``dualflow.nn`` network.
        x: inputs ``(B, ...)``.
        y: labels ``(B, ...)`` (regression targets or class indices).
        task: ``"regression"`` (needs ``noise_var``) or ``"classification"``.
        noise_var: observation noise variance for regression.
        modules: ``[(name, module), ...]`` whose outputs to smooth (default: the children of a
            ``Sequential``, else every leaf module).
        log_likelihood: custom per-example ``log p(y | output moments)``, shape ``(B,)``.

    Returns:
        One :class:`LayerMoments` per module, in execution order; moments are ``(B, ...)``.
    """
    ll = log_likelihood or log_likelihood_fn(task, noise_var)
    mods = list(modules) if modules is not None else _default_modules(model)
    records: list[tuple[str, Tensor, Tensor, Tensor, Tensor]] = []
    names = {id(m): n for n, m in mods}

    def hook(mod: torch.nn.Module, _inp: object, out: object) -> Gaussian:
        g = as_gaussian(out)  # type: ignore[arg-type]
        m, v = g.mean.detach(), g.var.detach()
        dm = torch.zeros_like(m, requires_grad=True)
        dv = torch.zeros_like(v, requires_grad=True)
        records.append((names[id(mod)], m, v, dm, dv))
        return Gaussian(g.mean + dm, g.var + dv)

    handles = [m.register_forward_hook(hook) for _, m in mods]
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = as_gaussian(model(x))
            logp = ll(out, y).sum()  # examples are independent: per-example gradients
            grads = torch.autograd.grad(logp, [t for r in records for t in r[3:]], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    result = []
    for i, (name, m, v, _, _) in enumerate(records):
        g_m, g_v = grads[2 * i], grads[2 * i + 1]
        g_m = torch.zeros_like(m) if g_m is None else g_m
        g_v = torch.zeros_like(v) if g_v is None else g_v
        d = v * g_m
        sm = Gaussian(m + d, (v + 2.0 * v * v * g_v - d * d).clamp_min(0.0))
        result.append(LayerMoments(name, Gaussian(m, v), sm))
    return result


@torch.no_grad()
def importance_smoothing(
    model: torch.nn.Module,
    x: Tensor,
    y: Tensor,
    noise_var: float,
    samples: int = 2000,
    modules: Sequence[tuple[str, torch.nn.Module]] | None = None,
    generator: torch.Generator | None = None,
) -> list[LayerMoments]:
    """Monte Carlo reference for :func:`smooth` on a Bayesian regression network.

    Draws ``samples`` weight sets from q (every :class:`BayesLayer`), runs the point network
    for each, and weights each draw by ``p(y | f(x; W)) = N(y; f, noise_var)`` (per example).
    "filtered" = moments of the activations over draws; "smoothed" = self-normalised
    importance-weighted moments (consistent as ``samples`` grows; its effective sample size
    falls when the likelihood is sharp).
    """
    from dualflow.methods.propagation import propagation  # lazy: methods builds on the core
    from dualflow.train.state import seeded

    mods = list(modules) if modules is not None else _default_modules(model)
    names = {id(m): n for n, m in mods}
    was = model.training
    model.eval()
    logws = []
    acts_all: list[dict[str, Tensor]] = []
    # one network per pass: the "reparam" propagation draws every layer's weights once per
    # forward (dualflow.nn.sampling.sample_weights), from a stream seeded by ``generator``
    seed = None if generator is None else int(torch.randint(0, 2**62, (), generator=generator))
    with propagation(model, "reparam"), seeded(seed):
        for _ in range(samples):
            acts: dict[str, Tensor] = {}

            def hook(mod, _i, out, acts=acts):
                acts[names[id(mod)]] = as_gaussian(out).mean

            hs = [m.register_forward_hook(hook) for _, m in mods]
            try:
                out = as_gaussian(model(x))
            finally:
                for h in hs:
                    h.remove()
            r = (y.reshape(out.mean.shape) - out.mean) ** 2
            logws.append((-0.5 * r / noise_var).reshape(r.shape[0], -1).sum(1))
            acts_all.append(acts)
    model.train(was)
    lw = torch.stack(logws)  # (S, B)
    w = torch.softmax(lw, dim=0)
    result = []
    for name, _ in mods:
        a = torch.stack([acts[name] for acts in acts_all])  # (S, B, ...)
        shape = (a.shape[0], a.shape[1]) + (1,) * (a.dim() - 2)
        ws = w.reshape(shape)
        fm, fv = a.mean(0), a.var(0)
        sm = (ws * a).sum(0)
        sv = (ws * (a - sm) ** 2).sum(0)
        result.append(LayerMoments(name, Gaussian(fm, fv), Gaussian(sm, sv)))
    return result
