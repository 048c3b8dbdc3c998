"""The classify runner's training aids (:class:`dualflow.variational.TrainingAids`: another
prior, a variance hold, a KL warm-up) and natural-gradient options, as hooks of the one loop.

Nothing here is a second loop: :func:`hooks` returns the keyword arguments of
:meth:`dualflow.methods.Method.fit` that plug the aids into :func:`dualflow.train.fit`:

* ``kl_fn``: the objective's KL under the aids' prior, times the warm-up factor of the step;
* ``optimizer``: the method's optimizer (the natural gradient with ``ng_options``) with a
  step pre-hook that drops the ``rho`` gradients while the variances are held;
* ``callbacks``: :class:`AidsCallback`, which keeps the aids' step index in line with the
  loop (also after a resume) and runs the empirical-Bayes update after every step.

Resumption stays exact: the checkpoint holds the weights, and the empirical-Bayes priors
(updated after every step, ``eb_every = 1``) are a function of the weights after the last
step, so :class:`AidsCallback` recomputes them from the resumed weights.
"""

from __future__ import annotations

from typing import Any

import torch

from dualflow import methods, train
from dualflow.experiments.classify.config import ClassifyConfig, Resolved
from dualflow.optim import NaturalGradient
from dualflow.variational import TrainingAids

__all__ = ["AidsCallback", "hooks", "make_aids"]


def make_aids(method: methods.Method, options: dict[str, Any], steps_per_epoch: int) -> TrainingAids:
    """:class:`~dualflow.variational.TrainingAids` from :attr:`ClassifyConfig.vi_options`
    (``*_epochs`` converted to steps)."""
    kw = dict(options)
    kw["natural_gradient"] = method.traits.natural_gradient
    for key in ("hold", "kl_warmup"):
        kw[f"{key}_steps"] = round(float(kw.pop(f"{key}_epochs", 0)) * steps_per_epoch)
    kw["eb_start"] = round(float(kw.pop("eb_start_epochs", 0)) * steps_per_epoch)
    return TrainingAids(method, **kw)


class AidsCallback(train.Callback):
    """Keeps ``aids.step`` at the index of the next optimizer step and runs the aids' update
    after every step (and, on a resume, recomputes the empirical-Bayes priors)."""

    def __init__(self, aids: TrainingAids) -> None:
        self.aids = aids

    def on_train_start(self, state: train.LoopState) -> None:
        self.aids.step = state.global_step
        if state.global_step > 0:
            self.aids.after_optimizer_step(state.global_step - 1)

    def on_step_end(self, state: train.LoopState) -> None:
        self.aids.after_optimizer_step(state.global_step - 1)
        self.aids.step = state.global_step


def _ng_optimizer(
    method: methods.Method,
    r: Resolved,
    options: dict[str, Any],
    steps_per_epoch: int,
    prior_in_gradient: bool,
) -> Any:
    """Factory of the natural gradient with ``ng_options``; ``prior_in_gradient``: the
    gradient carries the prior's cross-entropy (the mixture prior), so the optimizer gets
    ``kl_weight=0`` and a negligible Gaussian prior of its own."""
    ng = method.traits.optimizer
    o = dict(options)
    b1, b2 = ng.betas
    betas = (float(o.pop("b1", b1)), float(o.pop("b2", b2)))
    hold = round(float(o.pop("hold_epochs", 0)) * steps_per_epoch)

    def factory(params: list[Any]) -> torch.optim.Optimizer:
        return NaturalGradient(
            params,
            int(r.ng_data_size or 1),
            lr=ng.lr,
            betas=betas,
            positivity=ng.positivity,
            model=method,
            kl_weight=0.0 if prior_in_gradient else r.kl_weight_abs,
            prior_precision=1e-12 if prior_in_gradient else None,
            point_lr=r.lr,
            weight_decay=r.weight_decay,
            hold_steps=hold,
            damping=float(o.get("damping", 0.0)),
        )

    return factory


def hooks(
    cfg: ClassifyConfig,
    r: Resolved,
    method: methods.Method,
    config: train.TrainConfig,
    steps_per_epoch: int,
    data_size: int,
) -> tuple[dict[str, Any], TrainingAids | None]:
    """``(keyword arguments of Method.fit, aids or None)`` for ``cfg.vi_options`` and
    ``cfg.ng_options`` (nothing when both are empty: the plain Eq. 2 run). ``config`` and
    ``data_size`` are those given to :meth:`~dualflow.methods.Method.fit`."""
    aids = make_aids(method, cfg.vi_options, steps_per_epoch) if cfg.vi_options else None
    mixture = aids is not None and aids.mixture is not None
    if method.traits.natural_gradient and (cfg.ng_options or mixture):
        factory = _ng_optimizer(method, r, cfg.ng_options, steps_per_epoch, mixture)
    elif aids is None:
        return {}, None  # the method's own optimizer, nothing to hook
    else:

        def factory(params: list[Any]) -> torch.optim.Optimizer:
            return method.configure_optimizer(params, data_size, config)

    if aids is None:
        return {"optimizer": factory}, None

    def aided(params: list[Any]) -> torch.optim.Optimizer:
        opt = factory(params)
        opt.register_step_pre_hook(lambda *_: aids.before_optimizer_step(aids.step))
        return opt

    def kl_fn(_model: torch.nn.Module) -> torch.Tensor:
        return aids.kl() * aids.kl_factor(aids.step) if aids.kl_warmup_steps else aids.kl()

    return {"optimizer": aided, "kl_fn": kl_fn, "callbacks": [AidsCallback(aids)]}, aids
