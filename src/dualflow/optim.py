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
predictive objective on badly fit points, or a sampled Hessian estimate). Three rules keep
``lambda > 0`` (``"clip"``: see below):

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

Curvature and safeguards (issue 10; ``bp-ng``'s defaults in ``dualflow uci``). ``h = 2 g_s2``
is ``E_q[diag Hessian]`` only for an expected loss (the ELBO). For the paper's predictive
objective it is ``(1 - r^2/s)/s * dv/d sigma^2``, negative wherever a residual exceeds the
predictive variance; read as a curvature it made ``bp-ng`` diverge (precisions halved step
after step, then multiplied by up to 1e7 in one step by the "split" retraction, mean steps of
10-600 posterior sds; measured on the diverging UCI splits). The fixes, each optional:

* :meth:`NaturalGradient.set_curvature` with :func:`ggn_surrogate`: the generalized
  Gauss-Newton curvature (``>= 0``) from a second backward pass through the variance path;
* ``positivity="clip"`` (:func:`precision_update`): negative curvature dropped, every step a
  convex combination of the old precision and ``lambda0 + N h+``;
* ``precision_debias=True``: weight ``max(b2, 1/t)``, so the initial ``1/sigma_init^2`` (not a
  curvature estimate) is forgotten at the first step;
* ``max_step_sd`` (:func:`bounded_mean_step`): a trust region on the mean step in posterior
  standard deviations, floored at the fixed prior's.

With ``lr = 1``, ``b2 = 1`` and a trust region that does not bind, the one-step conjugate
property holds with all of them (tested).

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

from dualflow.nn.base import BayesLayer, empirical_prior_var

__all__ = [
    "POSITIVITY",
    "NaturalGradient",
    "bounded_mean_step",
    "ggn_surrogate",
    "ng_param_groups",
    "precision_update",
]

#: rules that keep the precision positive (:func:`precision_update`)
POSITIVITY: tuple[str, ...] = ("split", "ivon", "clip")


def precision_update(lam: Tensor, nh: Tensor, lam0: float | Tensor, b2: float, rule: str = "split") -> Tensor:
    """One precision update ``lambda' = (1 - b2) lambda + b2 (lambda0 + N h)`` kept positive.

    Args:
        lam: current precision ``lambda > 0`` (any shape).
        nh: ``N h``, the curvature estimate of the data term times ``N`` (same shape; may be
            negative).
        lam0: prior precision (float or 0-dim tensor, ``> 0``).
        b2: weight of the new estimate, ``0 < b2 <= 1``.
        rule: ``"split"``: the plain update where ``h >= 0``; the negative part ``B = b2 N h-``
            is applied to ``A = (1 - b2) lambda + b2 (lambda0 + N h+)`` by the Riemannian
            retraction ``A - B + B^2 / (2 A)`` (positive, but ``>> A`` when ``B >> A``).
            ``"ivon"``: IVON's correction on the whole step. ``"clip"``: negative curvature is
            dropped, ``lambda' = (1 - b2) lambda + b2 (lambda0 + N max(h, 0))``: a convex
            combination, so ``lambda' >= min(lambda, lambda0)`` and one step can at most
            multiply ``lambda`` by ``1 - b2`` (no collapse, no jump); where ``h >= 0`` it is the
            plain update, so the ``b2 = 1`` fixed point is kept.

    Returns:
        The new precision (a new tensor).
    """
    if rule == "split":
        a = nh.clamp_min(0.0).mul_(b2).add_(lam, alpha=1.0 - b2).add_(b2 * lam0)
        b = nh.neg().clamp_min_(0.0).mul_(b2)
        return torch.div(b, a).mul_(b).mul_(0.5).sub_(b).add_(a)  # a - b + b^2 / (2a)
    if rule == "ivon":
        t = nh.add(lam0)
        corr = (lam - t).square_().div_(lam).mul_(0.5 * b2 * b2)
        return t.mul_(b2).add_(lam, alpha=1.0 - b2).add_(corr)
    if rule == "clip":
        return nh.clamp_min(0.0).add_(lam0).mul_(b2).add_(lam, alpha=1.0 - b2)
    raise ValueError(f"positivity must be one of {list(POSITIVITY)}, got {rule!r}")


def ggn_surrogate(pred: Any, noise_var: Tensor | float) -> Tensor:
    """A scalar whose gradient in the weight variances is half the generalized Gauss-Newton
    curvature of the Gaussian regression loss: ``mean_i sum_d v_id / (2 s_id)`` with the
    predictive variance ``s = v + tau^2`` held constant (detached).

    Why: for ``E_q[(y - f)^2] / (2 s) = ((y - m)^2 + v) / (2 s)`` Price's theorem gives
    ``2 d/d sigma^2 = E_q[d^2/dw^2] = E_q[(df/dw)^2] / s`` (the GGN of ``N(y; f, s)``; the
    ``(y - m)^2`` part does not depend on ``sigma^2`` under the first-order rule), and
    ``d v / d sigma^2`` carries exactly that expected squared Jacobian through the moment
    propagation. It is ``>= 0`` where the moment rule makes ``v`` non-decreasing in every
    ``sigma^2`` (the first-order ReLU rule; linear layers always). The predictive objective's
    own ``2 g_s2 = (1 - r^2/s) / s * dv/d sigma^2`` is negative wherever the squared residual
    exceeds ``s`` and is not a curvature: using it as one is what made ``bp-ng`` diverge.

    Args:
        pred: output moments (a :class:`~dualflow.Gaussian`; for a heteroscedastic output
            ``(B, 2D)`` only the first ``D`` columns, the mean's, are used).
        noise_var: ``tau^2`` (scalar or broadcastable; for heteroscedastic outputs pass the
            per-example expected noise variance).
    """
    var = pred.var
    return (var / (var + noise_var).detach()).sum(dim=tuple(range(1, var.dim()))).mean() * 0.5


def bounded_mean_step(delta: Tensor, lam: Tensor, max_sd: float) -> Tensor:
    """``delta`` clipped element-wise to ``|delta| <= max_sd / sqrt(lam)``: a trust region of
    ``max_sd`` posterior standard deviations on the step of the means."""
    lim = lam.rsqrt().mul_(max_sd)
    return torch.maximum(torch.minimum(delta, lim), lim.neg_())


def ng_param_groups(
    model: torch.nn.Module, params: Iterable[torch.nn.Parameter] | None = None
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`NaturalGradient`.

    One group ``{"params": [mu, rho], "gaussian": True, "prior_precision": 1/prior_var,
    "empirical_prior": bool}`` per Bayesian weight or bias of every
    :class:`~dualflow.nn.BayesLayer` in ``model`` (``empirical_prior``: the layer's
    ``prior == "empirical"`` when the groups are made; the optimizer then uses the tensor's
    empirical-Bayes prior precision, :func:`dualflow.nn.empirical_prior_var`, at every step,
    with the layer's ``prior_pseudo_count``), then one group
    ``{"params": [...], "gaussian": False}`` with every other parameter (point parameters,
    updated by Adam).

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
                        {
                            "params": [mu, rho],
                            "gaussian": True,
                            "prior_precision": 1.0 / mod._prior_var,
                            "empirical_prior": mod.prior == "empirical",
                            "prior_pseudo_count": mod.prior_pseudo_count,
                        }
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
        positivity: ``"split"`` (default), ``"ivon"`` or ``"clip"`` (see module doc and
            :func:`precision_update`).
        max_step_sd: bound every mean step to this many posterior standard deviations
            (:func:`bounded_mean_step`; ``None``: no bound), and never more than that many
            standard deviations of the fixed prior (``1 / sqrt(prior_precision)``; this matters
            with an empirical prior, whose precision follows the weights).
        precision_debias: weight the new curvature by ``max(b2, 1/t)`` at step ``t``, so the
            precision is the running mean of the curvature targets until ``1/t < b2`` and the
            initial ``1/sigma_init^2`` (not a curvature estimate) is forgotten at step 1; the
            precision's analogue of Adam's bias correction.
        damping: ``delta >= 0``: the mean step divides by ``lambda + N delta`` instead of
            ``lambda`` (a trust region; the precision, i.e. the posterior variance, is not
            damped). Without it ``N / lambda`` reaches ``N / lambda0`` for weights the data
            barely constrain, a diagonal Newton step that ignores the coupling of a unit's
            weights; at N = 50 000 the undamped update diverges on an MNIST MLP
            (``results/classify/research.md``). Default 0: the update of docs/maths.md section 3.
        hold_steps: the precision keeps its initial value ``1/sigma^2`` for this many steps
            (the weight variances are held, the means move by momentum steps of size
            ``lr N sigma^2``); default 0.
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
        max_step_sd: float | None = None,
        precision_debias: bool = False,
        debias: bool = True,
        point_lr: float = 1e-3,
        point_betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        model: torch.nn.Module | None = None,
        damping: float = 0.0,
        hold_steps: int = 0,
    ) -> None:
        if not data_size >= 1:
            raise ValueError(f"data_size must be >= 1, got {data_size}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 < b2 <= 1.0):
            raise ValueError(f"betas must satisfy 0 <= b1 < 1 and 0 < b2 <= 1, got {betas}")
        if positivity not in POSITIVITY:
            raise ValueError(f"positivity must be one of {list(POSITIVITY)}, got {positivity!r}")
        if max_step_sd is not None and not max_step_sd > 0:
            raise ValueError(f"max_step_sd must be > 0 or None, got {max_step_sd}")
        if prior_precision is not None and not prior_precision > 0:
            raise ValueError(f"prior_precision must be > 0, got {prior_precision}")
        if not damping >= 0 or hold_steps < 0:
            raise ValueError(f"damping and hold_steps must be >= 0, got {damping}, {hold_steps}")
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
            max_step_sd=max_step_sd,
            precision_debias=precision_debias,
            gaussian=False,
        )
        super().__init__(out, defaults)
        self.data_size = int(data_size)
        self.kl_weight = 1.0 / data_size if kl_weight is None else float(kl_weight)
        self.damping, self.hold_steps = float(damping), int(hold_steps)
        self._curvature: dict[int, Tensor] = {}

    def set_curvature(self, surrogate: Tensor) -> None:
        """Use ``d surrogate / d sigma^2`` (instead of the ``rho`` gradient) as the curvature
        ``g_s2`` of the next step: ``N h = 2 N d surrogate / d sigma^2`` for every Gaussian
        group (the surrogate holds the data term only, no KL). Call it after the forward pass
        and before ``backward`` (it differentiates with ``retain_graph=True``).

        With :func:`ggn_surrogate` this is the generalized Gauss-Newton curvature, ``>= 0``.
        """
        rhos = [g["params"][1] for g in self.param_groups if g["gaussian"]]
        grads = torch.autograd.grad(surrogate, rhos, retain_graph=True, allow_unused=True)
        self._curvature = {id(r): g for r, g in zip(rhos, grads) if g is not None}

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
        b1, b2 = group["betas"]
        st = self.state[mu]
        sigma = F.softplus(rho)
        s2 = sigma.square()
        if group.get("empirical_prior") and self.defaults["prior_precision"] is None:
            # the tensor's empirical-Bayes prior, the one its KL was evaluated at
            c = float(group.get("prior_pseudo_count", 0.0))
            lam0: float | Tensor = empirical_prior_var(mu, s2, 1.0 / group["prior_precision"], c).reciprocal()
        else:
            lam0 = float(group["prior_precision"])
        if not st:
            st["step"] = 0
            st["precision"] = s2.reciprocal()
            st["momentum"] = torch.zeros_like(mu)
        st["step"] += 1
        lam = st["precision"]
        g_mu = mu.grad if mu.grad is not None else torch.zeros_like(mu)
        curv = self._curvature.pop(id(rho), None)
        g_rho = curv if curv is not None else (rho.grad if rho.grad is not None else torch.zeros_like(rho))
        # chain rule through sigma = softplus(rho): dL/drho = dL/ds2 * 2 sigma sigmoid(rho)
        nh = torch.sigmoid(rho).mul_(sigma).mul_(2.0).clamp_min_(1e-38)
        nh = torch.div(g_rho, nh).mul_(2.0 * n)  # 2 N g_s2
        if kw and curv is None:
            # remove the KL part: d(kw KL)/d s2 = 0.5 kw (lam0 - 1/s2), so N h = 2 N g_s2 - N kw (lam0 - 1/s2)
            nh.add_(s2.reciprocal(), alpha=n * kw).sub_(lam0 * (n * kw))
        if group["precision_debias"]:
            b2 = max(b2, 1.0 / st["step"])
        new_lam = precision_update(lam, nh, lam0, b2, group["positivity"])
        if st["step"] <= self.hold_steps:
            new_lam = lam  # the precision (the weight variances) held at its initial value
        st["precision"] = new_lam
        # momentum of g_mu(data) + lam0 mu / N, where g_mu(data) = g_mu - kw lam0 mu
        coef = lam0 * (1.0 / n - kw)
        g = g_mu if (isinstance(coef, float) and coef == 0.0) else g_mu + coef * mu
        mom = st["momentum"]
        mom.mul_(b1).add_(g, alpha=1.0 - b1)
        step = group["lr"] * n / ((1.0 - b1 ** st["step"]) if group["debias"] else 1.0)
        # damping: the mean step divides by lambda + N delta (the precision itself is not damped)
        denom = new_lam.add(n * self.damping) if self.damping else new_lam
        if group["max_step_sd"] is None:
            mu.addcdiv_(mom, denom, value=-step)
        else:
            # the trust region's precision is floored at the fixed prior precision: with an
            # empirical prior, lam0 follows the weights, and for zero-curvature weights
            # (lam = lam0) a bound in units of 1/sqrt(lam) could grow with them
            lam_tr = new_lam.clamp_min(float(group["prior_precision"]))
            mu.add_(bounded_mean_step(torch.div(mom, denom).mul_(-step), lam_tr, group["max_step_sd"]))
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
