"""Weight sampling in one place, and the propagation rules of a Bayesian layer as a table.

Every draw of a weight from ``q`` goes through :func:`weight_noise` /
:func:`sample_weights` (``W = mu + sigma eps``, ``sigma = softplus(rho)``): the sampling
propagations below, :func:`dualflow.models.point_state_dict` (one network drawn from ``q``)
and :func:`dualflow.smoothing.importance_smoothing` (via the ``"reparam"`` propagation).

:data:`PROPAGATION_RULES` maps each propagation mode of
:class:`~dualflow.nn.BayesLayer` (its ``propagation`` attribute) to a small function
``rule(layer, x) -> output``:

* ``"moments"``: Algorithm 1, the layer's own moment rule (``layer.forward_moments``);
* ``"reparam"``: one weight draw per forward pass, shared by the batch (Blundell et al. 2015);
* ``"local"``: pre-activations drawn from their exact Gaussian given the input, independently
  per example and unit (local reparameterisation, Kingma et al. 2015);
* ``"flipout"``: one shared perturbation decorrelated per example by random signs (Wen et al. 2018).

A layer supplies ``_map(x, weight, bias)`` (its linear map on plain tensors),
``_noise_shape(t)`` (per-example sign/noise shape) and ``_bias_view(b)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dualflow.gaussian import Gaussian

__all__ = ["PROPAGATION_RULES", "sample_weights", "sampled_parameters", "weight_noise"]


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.randn_like(like)
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)


def weight_noise(
    layer: Any, generator: torch.Generator | None = None, *, bias: bool = True
) -> tuple[Tensor, Tensor | None]:
    """One draw of the zero-mean weight perturbation ``(sigma_W eps_W, sigma_b eps_b)`` of a
    :class:`~dualflow.nn.BayesLayer` (``eps ~ N(0, I)``; the bias part is ``None`` for an
    absent bias or ``bias=False``). Point layers have none: zeros."""
    mu, b_mu = layer.weight_mu, layer.bias_mu if bias else None
    if not layer.bayes:
        return torch.zeros_like(mu), None if b_mu is None else torch.zeros_like(b_mu)
    dw = F.softplus(layer.weight_rho) * _randn(mu, generator)
    db = None if b_mu is None else F.softplus(layer.bias_rho) * _randn(b_mu, generator)
    return dw, db


def sample_weights(layer: Any, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
    """One network's weights ``(W, b) ~ q`` of a :class:`~dualflow.nn.BayesLayer`:
    ``mu + softplus(rho) eps`` (differentiable in ``mu`` and ``rho``); the means themselves for
    point layers."""
    if not layer.bayes:
        return layer.weight_mu, layer.bias_mu
    dw, db = weight_noise(layer, generator)
    w = layer.weight_mu + dw
    b = None if layer.bias_mu is None else layer.bias_mu + db
    return w, b


def sampled_parameters(model: torch.nn.Module, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """``{qualified name of each Gaussian layer's mean parameter: one draw from q}`` for every
    Bayesian layer of ``model`` (in module order, weight before bias), e.g. to load a point
    network of the same architecture."""
    from dualflow.nn.base import BayesLayer

    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, Tensor] = {}
    for mod in model.modules():
        if isinstance(mod, BayesLayer) and mod.bayes:
            w, b = sample_weights(mod, generator)
            out[names[id(mod.weight_mu)]] = w
            if b is not None:
                out[names[id(mod.bias_mu)]] = b
    return out


# ----------------------------------------------------------------------------- propagation rules


def _random_signs(shape: tuple[int, ...], like: Tensor) -> Tensor:
    return torch.randint(0, 2, shape, device=like.device).to(like.dtype).mul_(2.0).sub_(1.0)


def _plain(layer: Any, x: Any) -> Tensor:
    if isinstance(x, Gaussian):
        raise TypeError(
            f"{type(layer).__name__} with propagation={layer.propagation!r} takes a plain tensor, got a "
            "Gaussian; set the same propagation on the whole model (dualflow.methods.set_propagation)"
        )
    return x


def _moments(layer: Any, x: Any) -> Any:
    return layer.forward_moments(x)


def _reparam(layer: Any, x: Any) -> Tensor:
    w, b = sample_weights(layer)
    return layer._map(_plain(layer, x), w, b)


def _local(layer: Any, x: Any) -> Tensor:
    x = _plain(layer, x)
    if not layer.bayes:
        return layer._map(x, layer.weight_mu, layer.bias_mu)
    sigma = F.softplus(layer.weight_rho)
    b_var = None if layer.bias_rho is None else F.softplus(layer.bias_rho).square()
    mean = layer._map(x, layer.weight_mu, layer.bias_mu)
    var = layer._map(x * x, sigma * sigma, b_var)
    return mean + var.clamp_min(1e-30).sqrt() * torch.randn_like(mean)


def _flipout(layer: Any, x: Any) -> Tensor:
    x = _plain(layer, x)
    if not layer.bayes:
        return layer._map(x, layer.weight_mu, layer.bias_mu)
    # W_n = mu + delta * (s_out,n s_in,n^T) has the distribution of q for every example n
    mean = layer._map(x, layer.weight_mu, None)
    delta, _ = weight_noise(layer, bias=False)
    pert = layer._map(x * _random_signs(layer._noise_shape(x), x), delta, None)
    out = mean + pert * _random_signs(layer._noise_shape(pert), pert)
    if layer.bias_mu is not None:  # the bias is drawn independently per example (exact marginal)
        eps = torch.randn(layer._noise_shape(out), dtype=out.dtype, device=out.device)
        out = out + layer._bias_view(layer.bias_mu) + layer._bias_view(F.softplus(layer.bias_rho)) * eps
    return out


#: propagation mode -> ``rule(layer, x) -> output`` (see the module docstring)
PROPAGATION_RULES: dict[str, Callable[[Any, Any], Any]] = {
    "moments": _moments,
    "reparam": _reparam,
    "local": _local,
    "flipout": _flipout,
}
