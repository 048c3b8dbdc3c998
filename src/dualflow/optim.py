"""Natural-gradient variational optimizer for mean-field Gaussian weights (docs/maths.md section 3).

:class:`NaturalGradient` keeps, for every Bayesian weight ``w ~ N(mu, 1/lambda)`` of a
:class:`dualflow.nn.BayesLayer`, the mean ``mu`` (the layer's ``*_mu`` parameter, updated in
place) and the precision ``lambda`` (optimizer state), and writes
``sigma = 1/sqrt(lambda)`` back into the layer's ``*_rho`` parameter
(``rho = softplus^-1(sigma)``). It reads the ordinary autograd gradients of ``mu`` and
``rho``; ``g_{sigma^2}`` follows from the chain rule through ``sigma = softplus(rho)``:
``dL/drho = dL/d(sigma^2) * 2 sigma * sigmoid(rho)``.

With ``l = mean_batch J`` (data term), prior ``N(0, 1/lambda0)`` and ``N`` training examples
(docs/maths.md section 3, the paper's Appendix D)::

    h      = 2 g_s2                                    # E_q[diag Hessian of l] (Price/Bonnet)
    lambda = (1 - b2) lambda + b2 (lambda0 + N h)      # with a positivity rule, below
    mom    = b1 mom + (1 - b1) (g_mu + lambda0 mu / N)
    mu     = mu - lr * mom_hat * N / lambda            # mom_hat = mom / (1 - b1^t) (debias)

With ``lr = 1`` and ``b2 = 1`` one step is the fixed-point (message-passing) update.

Gradient of the KL term. :func:`dualflow.train.fit` differentiates
``mean J + kl_weight * KL(q || p)`` (``kl_weight = 1/N`` by default). The optimizer removes
the KL part from the incoming gradients analytically (``kl_weight`` argument; ``0`` if the
gradient holds the data term only) and applies the prior itself, as above; so the result is
the same whichever the caller used.

Positivity. ``h`` is negative where the loss is locally concave in a weight (e.g. the
predictive objective on badly fit points, or a sampled Hessian estimate). Two rules keep
``lambda > 0``:

* ``positivity="split"`` (default): the update is split into its part that is a convex
  combination of positive quantities, ``A = (1 - b2) lambda + b2 (lambda0 + N h+)``, and the
  negative-curvature part ``B = b2 N h-`` (``h = h+ - h-``). ``B`` is applied with the
  second-order Riemannian retraction of Lin, Schmidt & Khan (2020) / IVON (Shen et al. 2024)
  at ``A``: ``lambda' = A - B + B^2 / (2 A) = ((A - B)^2 + A^2) / (2 A) > 0``. Where ``h >= 0``
  this *is* the plain update (docs/maths.md section 3.1), so the ``lr = 1``, ``b2 = 1`` step
  stays exact.
* ``positivity="ivon"``: the literal rule first proposed (docs/maths.md section 7.2), IVON's
  correction on the whole step,
  ``lambda' = (1 - b2) lambda + b2 t + b2^2 (lambda - t)^2 / (2 lambda)`` with
  ``t = lambda0 + N h``. Always positive and it has the same fixed point, but the correction
  is not zero away from it: a ``b2 = 1`` step from ``lambda != t`` lands on
  ``t + (lambda - t)^2 / (2 lambda)``, not on ``t`` (it converges quadratically in repeated
  steps). The claim "with b2 = 1, lr = 1 this is the fixed point" therefore holds for this
  rule only at the fixed point, not for one step from elsewhere (tested in
  ``tests/test_optim.py``).

Mean-field caveat. For a linear-Gaussian model the mean-field optimum is the exact posterior
mean with precision ``diag`` of the posterior precision. One ``lr = 1``, ``b2 = 1`` step lands
``lambda`` on that diagonal exactly, but moves ``mu`` by a *diagonally* preconditioned Newton
step (a Jacobi iteration): it lands on the posterior mean in one step only when the posterior
precision is diagonal (e.g. orthogonal inputs); otherwise repeated steps converge to it.

Point parameters (biases without ``rho``, normalisation weights, a learned noise variance)
get Adam (``point_lr``, ``point_betas``, ``eps``, ``weight_decay``).

Do not clip gradients (``TrainConfig.grad_clip``) with this optimizer: the ``rho`` gradient is
read as curvature, and clipping it changes the precision, not just the step length.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dualflow.nn.base import BayesLayer

__all__ = ["NaturalGradient", "ng_param_groups"]


def ng_param_groups(
    model: torch.nn.Module, params: Iterable[torch.nn.Parameter] | None = None
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`NaturalGradient`.

    One group ``{"params": [mu, rho], "gaussian": True, "prior_precision": 1/prior_var}`` per
    Bayesian weight or bias of every :class:`~dualflow.nn.BayesLayer` in ``model``, then one
    group ``{"params": [...], "gaussian": False}`` with every other parameter (point
    parameters, updated by Adam).

    Args:
        model: the network (or any module containing it).
        params: restrict to these parameters (default: ``model.parameters()``); parameters
            not in ``model`` go to the point group.
    """
    chosen = list(model.parameters()) if params is None else list(params)
    ids = {id(p) for p in chosen}
    groups: list[dict[str, Any]] = []
    used: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, BayesLayer) and mod.bayes:
            for mu, rho in mod.variational_pairs():
                if id(mu) in ids and id(rho) in ids and id(mu) not in used:
                    groups.append(
                        {"params": [mu, rho], "gaussian": True, "prior_precision": 1.0 / mod.prior_var}
                    )
                    used.update((id(mu), id(rho)))
    point, seen = [], set(used)
    for p in chosen:
        if id(p) not in seen:
            point.append(p)
            seen.add(id(p))
    if point:
        groups.append({"params": point, "gaussian": False})
    return groups


class NaturalGradient(torch.optim.Optimizer):
    """Natural-gradient variational inference for mean-field Gaussian weights (see module doc).

    Args:
        params: parameter groups from :func:`ng_param_groups` (each Gaussian group holds
            ``[mu, rho]`` and ``"gaussian": True``), or plain parameters together with
            ``model=`` (the optimizer pairs them itself). Plain parameters without ``model``
            raise ``ValueError``: nothing tells which ``rho`` belongs to which ``mu``.
        data_size: ``N``, the number of training examples.
        lr: step size of the means (``1``: the fixed-point update).
        betas: ``(b1, b2)``: momentum of the mean gradient, and the weight of the new
            curvature in the precision average (``b2 = 1``: replace; the convention of docs/maths.md
            section 3, *not* Adam's).
        prior_precision: ``lambda0`` for every Gaussian group (default: the group's
            ``prior_precision``, i.e. the layer's ``1/prior_var``).
        kl_weight: factor of ``KL(q||p)`` already contained in the gradients (``None``:
            ``1/N``, what :func:`dualflow.train.fit` uses; ``0``: data term only).
        positivity: ``"split"`` (default) or ``"ivon"`` (see module doc).
        debias: divide the momentum by ``1 - b1^t`` (as Adam/IVON).
        point_lr, point_betas, eps, weight_decay: Adam for point parameters.
        model: the module holding the parameters (only needed for plain parameters).
    """

    def __init__(
        self,
        params: Iterable[Any],
        data_size: int,
        lr: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.1),
        prior_precision: float | None = None,
        *,
        kl_weight: float | None = None,
        positivity: str = "split",
        debias: bool = True,
        point_lr: float = 1e-3,
        point_betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        model: torch.nn.Module | None = None,
    ) -> None:
        if not data_size >= 1:
            raise ValueError(f"data_size must be >= 1, got {data_size}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 < b2 <= 1.0):
            raise ValueError(f"betas must satisfy 0 <= b1 < 1 and 0 < b2 <= 1, got {betas}")
        if positivity not in ("split", "ivon"):
            raise ValueError(f"positivity must be 'split' or 'ivon', got {positivity!r}")
        if prior_precision is not None and not prior_precision > 0:
            raise ValueError(f"prior_precision must be > 0, got {prior_precision}")
        groups = list(params)
        if not groups:
            raise ValueError("NaturalGradient got an empty parameter list")
        if not isinstance(groups[0], dict):
            if model is None:
                raise ValueError(
                    "NaturalGradient needs to know which rho belongs to which mu: pass "
                    "dualflow.optim.ng_param_groups(model) as params, or params together with model="
                )
            groups = ng_param_groups(model, groups)
        out = []
        for g in groups:
            g = dict(g)
            g["params"] = list(g["params"])
            if g.get("gaussian", False):
                if len(g["params"]) != 2:
                    raise ValueError("a Gaussian parameter group must hold exactly [mu, rho]")
                mu, rho = g["params"]
                if mu.shape != rho.shape:
                    raise ValueError(f"mu and rho shapes differ: {tuple(mu.shape)} vs {tuple(rho.shape)}")
                if prior_precision is not None:
                    g["prior_precision"] = float(prior_precision)
                if g.get("prior_precision") is None:
                    raise ValueError("a Gaussian parameter group needs a prior_precision")
            else:
                g["gaussian"] = False
                g.setdefault("lr", point_lr)
            out.append(g)
        defaults = dict(
            lr=lr,
            betas=(float(b1), float(b2)),
            prior_precision=prior_precision,
            point_betas=point_betas,
            eps=eps,
            weight_decay=weight_decay,
            debias=debias,
            positivity=positivity,
            gaussian=False,
        )
        super().__init__(out, defaults)
        self.data_size = int(data_size)
        self.kl_weight = 1.0 / data_size if kl_weight is None else float(kl_weight)

    def precision(self, mu: torch.nn.Parameter) -> Tensor | None:
        """The precision ``lambda`` kept for the weight whose mean is ``mu`` (``None`` before the
        first step)."""
        st = self.state.get(mu)
        return None if not st else st.get("precision")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["gaussian"]:
                self._gaussian_step(group)
            else:
                self._adam_step(group)
        return loss

    def _gaussian_step(self, group: dict[str, Any]) -> None:
        # Written with in-place ops: the step is ~20 element-wise passes over the weights.
        mu, rho = group["params"]
        if mu.grad is None and rho.grad is None:
            return
        n = float(self.data_size)
        kw = self.kl_weight
        lam0 = float(group["prior_precision"])
        b1, b2 = group["betas"]
        st = self.state[mu]
        sigma = F.softplus(rho)
        if not st:
            st["step"] = 0
            st["precision"] = sigma.square().reciprocal_()
            st["momentum"] = torch.zeros_like(mu)
        st["step"] += 1
        lam = st["precision"]
        g_mu = mu.grad if mu.grad is not None else torch.zeros_like(mu)
        g_rho = rho.grad if rho.grad is not None else torch.zeros_like(rho)
        # chain rule through sigma = softplus(rho): dL/drho = dL/ds2 * 2 sigma sigmoid(rho)
        nh = torch.sigmoid(rho).mul_(sigma).mul_(2.0).clamp_min_(1e-38)
        nh = torch.div(g_rho, nh).mul_(2.0 * n)  # 2 N g_s2
        if kw:
            # remove the KL part: d(kw KL)/d s2 = 0.5 kw (lam0 - 1/s2), so N h = 2 N g_s2 - N kw (lam0 - 1/s2)
            nh.add_(sigma.square_().reciprocal_(), alpha=n * kw).sub_(n * kw * lam0)
        if group["positivity"] == "split":
            a = nh.clamp_min(0.0).mul_(b2).add_(lam, alpha=1.0 - b2).add_(b2 * lam0)
            b = nh.neg_().clamp_min_(0.0).mul_(b2)
            new_lam = torch.div(b, a).mul_(b).mul_(0.5).sub_(b).add_(a)  # a - b + b^2 / (2a)
        else:
            t = nh.add_(lam0)
            corr = (lam - t).square_().div_(lam).mul_(0.5 * b2 * b2)
            new_lam = t.mul_(b2).add_(lam, alpha=1.0 - b2).add_(corr)
        st["precision"] = new_lam
        # momentum of g_mu(data) + lam0 mu / N, where g_mu(data) = g_mu - kw lam0 mu
        coef = lam0 * (1.0 / n - kw)
        g = g_mu if coef == 0.0 else g_mu.add(mu, alpha=coef)
        mom = st["momentum"]
        mom.mul_(b1).add_(g, alpha=1.0 - b1)
        step = group["lr"] * n / ((1.0 - b1 ** st["step"]) if group["debias"] else 1.0)
        mu.addcdiv_(mom, new_lam, value=-step)
        s_new = new_lam.rsqrt()
        rho.copy_(s_new.neg().expm1_().neg_().log_().add_(s_new))  # softplus^-1(1/sqrt(lambda))

    def _adam_step(self, group: dict[str, Any]) -> None:
        b1, b2 = group["point_betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            if group["weight_decay"]:
                g = g.add(p, alpha=group["weight_decay"])
            st = self.state[p]
            if not st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            st["exp_avg"].mul_(b1).add_(g, alpha=1.0 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1.0 - b2)
            c1 = 1.0 - b1 ** st["step"]
            c2 = 1.0 - b2 ** st["step"]
            denom = (st["exp_avg_sq"] / c2).sqrt_().add_(group["eps"])
            p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / c1)
