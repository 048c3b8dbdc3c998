"""Post-hoc moments for a trained point network: a diagonal Laplace approximation, then
sampling-free predictive moments by moment propagation.

From a trained ``torch.nn`` model ``f(x; theta*)`` and its training data, :func:`laplace`
fits a diagonal Gaussian ``q(theta) = N(theta*, diag(1 / (h + delta)))`` over the weights
and biases of the model's linear and convolutional layers:

* ``h`` is the diagonal of the generalised Gauss-Newton matrix (GGN) of the data term:
  regression ``h_i = sum_n sum_d J_{nd,i}^2 / sigma^2``; classification
  ``h_i = sum_n [sum_c p_c J_{nc,i}^2 - (sum_c p_c J_{nc,i})^2]`` (the softmax Hessian
  ``diag(p) - p p^T`` between the Jacobians), with ``J`` the per-example Jacobian of the
  outputs (logits) in ``theta``, computed exactly with ``torch.func``;
* the prior precision ``delta`` (one scalar, or one per layer) and, for regression, the
  noise variance ``sigma^2`` maximise the Laplace approximation of the marginal likelihood
  (MacKay 1992; Immer et al. 2021)
  ``log p(D) ~ log p(D | theta*) - delta/2 |theta*|^2 + P/2 log delta - 1/2 sum_i log(h_i + delta)``.
  By default the noise is instead the maximum-likelihood noise of the trained network's
  residuals and only ``delta`` is fitted: with a diagonal GGN the evidence is biased towards
  large noise (below), which costs test log-likelihood (measured in
  ``benchmarks/results/posthoc.md``);

and returns the model converted by :func:`dualflow.convert` with those weight variances, so
one deterministic forward pass gives the predictive mean and variance (moment propagation,
the paper's Algorithm 1) instead of Jacobian products or weight samples. By default the
activations use the first-order rule (the paper's Eq. 3), which makes that pass the
linearised (GLM) predictive of the diagonal posterior (Immer et al. 2021 show the
linearised predictive of a Laplace posterior beats the network's own); ``predictive="moments"``
uses the closed-form rules instead.

Approximations: the Laplace approximation itself; a diagonal posterior (no correlations
between weights); the diagonal GGN replaces the log determinant by the sum of the diagonal's
logs, an upper bound (Hadamard's inequality), which penalises complexity more than the full
GGN would; moment propagation's mean-field rules (see :mod:`dualflow.ops`). Parameters outside
linear/convolutional layers (normalisation affines, free tensors) are held at their trained
values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from dualflow import losses, rules
from dualflow import nn as dnn
from dualflow.convert_fx import ConvertedModel, convert
from dualflow.gaussian import Gaussian, as_gaussian
from dualflow.nn.activations import Activation
from dualflow.nn.base import BayesLayer, split_input

__all__ = [
    "LinearizedConv1d",
    "LinearizedConv2d",
    "LinearizedLinear",
    "PosthocLaplace",
    "diag_ggn",
    "laplace",
]

TASKS = ("regression", "classification")


class _Linearized:
    """A Bayesian weight layer propagating to first order in the weight noise (the GLM rule).

    Variance ``A_{mu^2}(v) + A_{sigma^2}(m^2) + sigma_b^2``: the exact rule's
    ``A_{sigma^2}(v)``, a product of an input variance and a weight variance, is second order
    and is dropped, as the linearised network drops it. With the Taylor rule for the
    activations, a network of these layers computes the linearised (GLM) predictive of a
    diagonal weight posterior (exactly for one hidden layer).
    """

    def forward(self, x: Any) -> Any:
        if self.propagation != "moments" or not self.bayes:
            return super().forward(x)  # type: ignore[misc]
        m, v = split_input(x)
        w_m, w_v, b_m, b_v = self._moments()  # type: ignore[attr-defined]
        mean, var = self._rule(m, None, w_m, w_v, b_m, b_v)
        if v is not None:
            var = var + self._rule(v, None, w_m * w_m, None)[0]
        return Gaussian(mean, var)


class LinearizedLinear(_Linearized, dnn.Linear):
    """:class:`dualflow.nn.Linear` with the first-order (GLM) variance rule (see ``_Linearized``)."""

    def _rule(self, *args: Any) -> tuple[Tensor, Tensor]:
        return rules.linear(*args)


class _LinearizedConv(_Linearized):
    def _rule(self, *args: Any) -> tuple[Tensor, Tensor]:
        kw = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        return rules.conv(*args, **kw)


class LinearizedConv1d(_LinearizedConv, dnn.Conv1d):
    """:class:`dualflow.nn.Conv1d` with the first-order (GLM) variance rule."""


class LinearizedConv2d(_LinearizedConv, dnn.Conv2d):
    """:class:`dualflow.nn.Conv2d` with the first-order (GLM) variance rule."""


_LINEARIZED = {dnn.Linear: LinearizedLinear, dnn.Conv1d: LinearizedConv1d, dnn.Conv2d: LinearizedConv2d}


def _linearize(model: ConvertedModel) -> None:
    """Swap every weight layer for its first-order twin and every activation to Eq. 3."""
    from dualflow.io import module_spec

    for path, mod in list(model.named_modules()):
        if type(mod) in _LINEARIZED:
            kw = module_spec(mod)["kwargs"]
            kw["dtype"] = mod.weight_mu.dtype
            new = _LINEARIZED[type(mod)](**kw, device=mod.weight_mu.device)
            new.load_state_dict(mod.state_dict())
            new.prior_var = mod.prior_var
            new.check_inputs = mod.check_inputs
            new.train(mod.training)
            model.add_submodule(path, new)
        elif isinstance(mod, Activation):
            mod.method = "taylor"


@dataclasses.dataclass
class PosthocLaplace:
    """The result of :func:`laplace`.

    Attributes:
        model: the converted model with Gaussian weights ``N(theta*, 1/(h + delta))``.
        task: ``"regression"`` or ``"classification"``.
        noise_var: fitted observation noise variance ``sigma^2`` (regression), else ``None``.
        prior_precision: fitted ``delta``: a float, or per layer ``{layer path: float}``.
        log_marglik: the Laplace log marginal likelihood at the fitted values.
        n_params: number of parameters with a Gaussian (``P``).
    """

    model: ConvertedModel
    task: str
    noise_var: float | None
    prior_precision: float | dict[str, float]
    log_marglik: float
    n_params: int

    def predictive(self, x: Any) -> Gaussian | Tensor:
        """The predictive distribution (differentiable, in the model's current mode).

        Regression: a :class:`dualflow.Gaussian` over ``y`` (variance including ``sigma^2``);
        classification: probabilities ``(B, C)`` by the probit approximation.
        """
        out = self.model(x)
        if self.task == "classification":
            return losses.predictive_probs(out)
        g = as_gaussian(out)
        return Gaussian(g.mean, g.var + self.noise_var)

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 4096) -> Gaussian | Tensor:
        """:meth:`predictive` in eval mode, without gradients, in batches of ``batch_size``."""
        was = self.model.training
        self.model.eval()
        try:
            outs = [self.predictive(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        finally:
            self.model.train(was)
        if self.task == "classification":
            return torch.cat(outs)
        return Gaussian(torch.cat([o.mean for o in outs]), torch.cat([o.var for o in outs]))


def _batches(data: Any, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs and targets differ in length: {x.shape[0]} vs {y.shape[0]}")
        return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    return data  # an iterable of (x, y) batches, e.g. a DataLoader


def _layer_params(converted: ConvertedModel) -> dict[str, list[str]]:
    """Original parameter names of every converted weight layer, grouped by layer path."""
    out: dict[str, list[str]] = {}
    for path, mod in converted.named_modules():
        if isinstance(mod, BayesLayer):
            names = [converted.source_names[f"{path}.weight_mu"]]
            if mod.bias_mu is not None:
                names.append(converted.source_names[f"{path}.bias_mu"])
            out[path] = names
    return out


def diag_ggn(
    model: nn.Module,
    data: Any,
    names: list[str],
    task: str = "regression",
    batch_size: int = 256,
) -> tuple[dict[str, Tensor], float, int, int]:
    """Diagonal GGN of the data term w.r.t. parameters ``names`` (the model in eval mode).

    Regression returns the noise-free sum ``sum_n sum_d J^2`` (divide by ``sigma^2``).

    Returns:
        ``(diag per name, data term, N, D)``: for regression the data term is the sum of
        squared residuals, for classification the log-likelihood ``sum_n log p(y_n | x_n)``;
        ``D`` is the output size.
    """
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    diff = {k: params[k] for k in names}
    fixed = {**{k: v for k, v in params.items() if k not in diff}, **buffers}

    def f(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, {**p, **fixed}, (x.unsqueeze(0),)).squeeze(0)

    jac_fn = vmap(jacrev(f), in_dims=(None, 0))
    diag = {k: torch.zeros_like(v) for k, v in diff.items()}
    stat, n, d_out = 0.0, 0, 0
    for xb, yb in _batches(data, batch_size):
        with torch.no_grad():
            out = functional_call(model, {**diff, **fixed}, (xb,))
        jac = jac_fn(diff, xb)  # name -> (B, D, *shape)
        d_out = out.shape[-1] if out.dim() > 1 else 1
        n += xb.shape[0]
        if task == "regression":
            t = yb.reshape(out.shape).to(out.dtype)
            stat += float(((out - t) ** 2).sum())
            for k, j in jac.items():
                diag[k] += (j.detach() ** 2).sum(dim=(0, 1)) if j.dim() > 1 else j**2
        else:
            p = torch.softmax(out, dim=-1)
            stat += float(torch.log_softmax(out, -1).gather(1, yb.long().unsqueeze(1)).sum())
            for k, j in jac.items():
                j = j.detach()
                pj = p.reshape(*p.shape, *([1] * (j.dim() - 2)))
                diag[k] += (pj * j * j).sum(dim=(0, 1)) - ((pj * j).sum(dim=1) ** 2).sum(dim=0)
    if n == 0:
        raise ValueError("laplace: the data is empty")
    return diag, stat, n, d_out


def _log_marglik(
    log_delta: Tensor,
    log_sigma2: Tensor | None,
    g: list[Tensor],
    theta2: list[Tensor],
    stat: float,
    n: int,
    d: int,
) -> Tensor:
    """Laplace log marginal likelihood (diagonal), up to a constant, per layer groups ``g``."""
    deltas = log_delta.exp().expand(len(g))
    if log_sigma2 is not None:
        s2 = log_sigma2.exp()
        loglik = -0.5 * n * d * (math.log(2 * math.pi) + log_sigma2) - 0.5 * stat / s2
        hs = [gi / s2 for gi in g]
    else:
        loglik = torch.as_tensor(stat, dtype=log_delta.dtype)
        hs = g
    total = loglik
    for h, t2, dl in zip(hs, theta2, deltas):
        total = total - 0.5 * dl * t2 + 0.5 * h.numel() * torch.log(dl) - 0.5 * torch.log(h + dl).sum()
    return total


def laplace(
    model: nn.Module,
    data: Any,
    task: str = "regression",
    *,
    prior_precision: float | str = "marglik",
    noise_var: float | str = "residuals",
    layerwise: bool = False,
    predictive: str = "linearized",
    batch_size: int = 256,
    max_iter: int = 200,
) -> PosthocLaplace:
    """Diagonal Laplace (GGN) over a trained point network, as a moment-propagating model.

    Args:
        model: a trained ``torch.nn.Module`` (any model :func:`dualflow.convert` converts),
            mapping inputs to regression outputs ``(B, D)`` or logits ``(B, C)``. Used in eval
            mode; it is not modified.
        data: the training data, ``(inputs, targets)`` tensors or an iterable of such batches.
        task: ``"regression"`` (Gaussian likelihood, homoscedastic noise) or ``"classification"``.
        prior_precision: ``delta`` of the prior ``N(0, 1/delta)``: a number, or ``"marglik"``
            to fit it by the Laplace marginal likelihood.
        noise_var: ``sigma^2`` (regression): ``"residuals"`` (default): the maximum-likelihood
            noise of the trained network, ``mean (y - f(x; theta*))^2`` over the training data;
            ``"marglik"``: fitted jointly with the prior precision by the marginal likelihood
            (whose diagonal log determinant over-penalises complexity and so inflates the noise,
            see the module docstring and ``benchmarks/results/posthoc.md``); or a number.
        layerwise: one prior precision per layer instead of one for all.
        predictive: how the converted model propagates: ``"linearized"`` (default): to first
            order in the weight noise, activations by the paper's Eq. 3, ``(f(m), f'(m)^2 v)``,
            and weight layers without the second-order ``A_{sigma^2}(v)`` term
            (:class:`LinearizedLinear`), so the mean is the trained network's output and the
            variance the linearised (GLM) predictive of the diagonal posterior (exactly, for
            one hidden layer; deeper, mean-field treats the units of a layer as independent);
            ``"moments"``: the full rules (closed-form ReLU, ...), the network's own predictive
            under the diagonal posterior, where poorly determined weights (posterior = prior)
            shift the means through the non-linearities and multiply into large variances
            (it loses test log-likelihood on UCI: see ``benchmarks/results/posthoc.md``).
        batch_size: examples per Jacobian batch (memory ``batch_size x D x P``).
        max_iter: L-BFGS iterations of the hyperparameter fit.

    Returns:
        :class:`PosthocLaplace` (its ``model`` predicts in one pass; ``predict`` adds the noise).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if predictive not in ("linearized", "moments"):
        raise ValueError(f"predictive must be 'linearized' or 'moments', got {predictive!r}")
    if task == "classification" and noise_var not in ("residuals", "marglik"):
        raise ValueError("noise_var applies to regression only")
    for name, val, words in (
        ("prior_precision", prior_precision, ("marglik",)),
        ("noise_var", noise_var, ("marglik", "residuals")),
    ):
        if isinstance(val, str) and val not in words:
            raise ValueError(f"{name} must be a positive number or one of {words}, got {val!r}")
        if not isinstance(val, str) and not val > 0:
            raise ValueError(f"{name} must be > 0, got {val}")
    was = model.training
    model.eval()
    try:
        probe = convert(model, bayes=True)
        groups = _layer_params(probe)
        names = [k for ks in groups.values() for k in ks]
        if not names:
            raise ValueError("laplace: the model has no linear or convolutional layer")
        diag, stat, n, d = diag_ggn(model, data, names, task, batch_size)
    finally:
        model.train(was)

    params = dict(model.named_parameters())
    if layerwise:
        blocks = list(groups.values())
    else:
        blocks = [names]
    g = [torch.cat([diag[k].flatten() for k in blk]).double() for blk in blocks]
    theta2 = [sum(float((params[k].detach().double() ** 2).sum()) for k in blk) for blk in blocks]
    theta2_t = [torch.tensor(t, dtype=torch.float64) for t in theta2]

    fit_delta = prior_precision == "marglik"
    fit_sigma = task == "regression" and noise_var == "marglik"
    n_blocks = len(blocks)
    init_delta = 1.0 if fit_delta else float(prior_precision)
    log_delta = torch.full((n_blocks,), math.log(init_delta), dtype=torch.float64, requires_grad=fit_delta)
    log_sigma2 = None
    if task == "regression":
        s2 = stat / (n * d) if isinstance(noise_var, str) else float(noise_var)
        log_sigma2 = torch.tensor(math.log(max(s2, 1e-12)), dtype=torch.float64, requires_grad=fit_sigma)
    free = [t for t, on in ((log_delta, fit_delta), (log_sigma2, fit_sigma)) if on]
    if free:
        opt = torch.optim.LBFGS(free, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = -_log_marglik(log_delta, log_sigma2, g, theta2_t, stat, n, d)
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        lml = float(_log_marglik(log_delta, log_sigma2, g, theta2_t, stat, n, d))
        deltas = log_delta.exp().tolist()
        s2 = float(log_sigma2.exp()) if log_sigma2 is not None else None
    if not all(math.isfinite(x) and x > 0 for x in deltas) or (s2 is not None and not math.isfinite(s2)):
        raise RuntimeError("laplace: the marginal-likelihood fit diverged; pass prior_precision/noise_var")

    variances: dict[str, Tensor] = {}
    for blk, dl in zip(blocks, deltas):
        for k in blk:
            h = diag[k] / s2 if s2 is not None else diag[k]
            variances[k] = 1.0 / (h + dl)
    # the layers' prior variance is the fitted 1/delta, so kl() of the result is consistent
    layer_delta = {path: deltas[i] if layerwise else deltas[0] for i, path in enumerate(groups)}
    out = convert(model, bayes=True, weight_var=variances)
    for path, mod in out.named_modules():
        if isinstance(mod, BayesLayer) and path in layer_delta:
            mod.prior_var = 1.0 / layer_delta[path]
    if predictive == "linearized":
        _linearize(out)
    out.train(False)
    pp: float | dict[str, float] = layer_delta if layerwise else deltas[0]
    return PosthocLaplace(out, task, s2, pp, lml, sum(x.numel() for x in g))
