"""The step's objective: ``mean_batch J + kl_weight KL(q||p)`` as one module.

:class:`Objective` is what one training step differentiates, and the module that
distributed data parallel wraps (its gradient averaging then sees one forward per step).
Mixed targets (mixup / cutmix) are handled here, once, for every loss:
``lam J(out, y_a) + (1 - lam) J(out, y_b)`` (:class:`MixedTargets`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dualflow.nn.base import kl as model_kl
from dualflow.train.numerics import _float_out, autocast

__all__ = ["MixedTargets", "Objective", "StepResult", "mixed_loss"]


class MixedTargets(NamedTuple):
    """Targets of a mixed batch: example ``i`` is ``lam`` parts of class ``y_a[i]`` and
    ``1 - lam`` parts of class ``y_b[i]`` (mixup, cutmix)."""

    y_a: Tensor
    y_b: Tensor
    lam: float

    def soft(self, num_classes: int) -> Tensor:
        """Soft targets ``lam onehot(y_a) + (1 - lam) onehot(y_b)``, shape ``(B, num_classes)``."""
        a = F.one_hot(self.y_a, num_classes).float()
        b = F.one_hot(self.y_b, num_classes).float()
        return self.lam * a + (1.0 - self.lam) * b

    def loss(self, loss_fn: Callable[[Any, Tensor], Tensor], output: Any) -> Tensor:
        """``lam loss_fn(output, y_a) + (1 - lam) loss_fn(output, y_b)``."""
        return mixed_loss(loss_fn, output, self)

    @property
    def size(self) -> int:
        return int(self.y_a.shape[0])


def mixed_loss(
    loss_fn: Callable[[Any, Tensor], Tensor], outputs: Any, targets: Tensor | MixedTargets
) -> Tensor:
    """``loss_fn(outputs, targets)``; for :class:`MixedTargets` the mixture
    ``lam loss_fn(outputs, y_a) + (1 - lam) loss_fn(outputs, y_b)``, which for any loss
    linear in the one-hot target (cross-entropy, :func:`dualflow.losses.categorical_nll`)
    equals the loss against the soft target :meth:`MixedTargets.soft`."""
    if not isinstance(targets, MixedTargets):
        return loss_fn(outputs, targets)
    if targets.lam >= 1.0:
        return loss_fn(outputs, targets.y_a)
    return targets.lam * loss_fn(outputs, targets.y_a) + (1.0 - targets.lam) * loss_fn(outputs, targets.y_b)


class StepResult(NamedTuple):
    """What :class:`Objective` returns: the objective to differentiate, its (detached) data
    term and KL, and the (detached) metric sums of the batch."""

    loss: Tensor
    data: Tensor
    kl: Tensor
    metrics: dict[str, Tensor]


def _none(*_: Any) -> Any:  # placeholder loss of a step_fn objective
    raise RuntimeError("unreachable: this Objective computes its data term with step_fn")


class Objective(torch.nn.Module):
    """``forward(x, targets) -> StepResult``: ``loss = J + kl_weight KL`` with
    ``J = loss_fn(forward(x), targets)`` (mixed targets: :func:`mixed_loss`).

    Args:
        model: the module trained (its KL is ``dualflow.nn.kl(model)``; 0 without Bayesian layers).
        loss_fn: ``loss_fn(outputs, targets) -> mean J``; a module (e.g. a likelihood with a
            learned noise variance) becomes a submodule, so its parameters train too.
        kl_weight: factor of the KL (``1/N`` is Eq. 2).
        forward: ``forward(x) -> outputs`` (default ``model(x)``); e.g. a method's several
            passes per batch (:meth:`dualflow.methods.Method.training_outputs`).
        step_fn: ``step_fn(model, x, targets) -> mean J`` replacing forward and loss.
        metrics: ``metrics(outputs, targets) -> {name: sum over the batch}`` (no grad).
        amp_device: run ``forward`` under bf16 autocast on this device; the outputs are cast
            to float32 before the loss, and the KL is computed in float32 (outside autocast).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[Any, Any], Tensor] | None,
        kl_weight: float,
        *,
        forward: Callable[[Any], Any] | None = None,
        step_fn: Callable[[torch.nn.Module, Any, Any], Tensor] | None = None,
        metrics: Callable[[Any, Any], dict[str, Tensor]] | None = None,
        amp_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        #: the loss as a submodule (its parameters train, DDP syncs them), or ``None``
        self.loss_module = loss_fn if isinstance(loss_fn, torch.nn.Module) and loss_fn is not model else None
        object.__setattr__(self, "loss_fn", loss_fn if loss_fn is not None else _none)  # not registered twice
        self.kl_weight = float(kl_weight)
        self.step_fn = step_fn
        self.metrics_fn = metrics
        self.amp_device = amp_device
        # plain attributes (no second registration of the model; no Module.__getattr__ per step)
        object.__setattr__(self, "forward_fn", forward if forward is not None else model)
        object.__setattr__(self, "_trained", model)

    def forward(self, x: Any, targets: Any) -> StepResult:  # type: ignore[override]
        outputs = None
        model = self._trained
        if self.step_fn is not None:
            data = self.step_fn(model, x, targets)
        else:
            if self.amp_device is not None:
                with autocast(self.amp_device):
                    outputs = self.forward_fn(x)
                outputs = _map_outputs(_float_out, outputs)
            else:
                outputs = self.forward_fn(x)
            if isinstance(targets, MixedTargets):
                data = mixed_loss(self.loss_fn, outputs, targets)
            else:
                data = self.loss_fn(outputs, targets)
        kl = model_kl(model)
        if not kl.requires_grad and kl.device != data.device:  # a point model's KL is a CPU zero
            kl = kl.to(data.device)
        loss = data + self.kl_weight * kl if self.kl_weight else data
        metrics: dict[str, Tensor] = {}
        if self.metrics_fn is not None:
            with torch.no_grad():
                metrics = self.metrics_fn(outputs, targets)
        return StepResult(loss, data.detach(), kl.detach(), metrics)


def _map_outputs(fn: Callable[[Any], Any], out: Any) -> Any:
    if isinstance(out, list | tuple) and not hasattr(out, "_fields"):
        return type(out)(_map_outputs(fn, o) for o in out)
    return fn(out)
