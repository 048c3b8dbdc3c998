"""Switch how the Bayesian layers of a model propagate: moments (Algorithm 1) or weight samples."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.modules.dropout import _DropoutNd

from dualflow.nn.base import PROPAGATIONS, BayesLayer
from dualflow.nn.dropout import Dropout

__all__ = ["PROPAGATIONS", "get_propagation", "mc_dropout", "propagation", "set_propagation"]


def _check(mode: str) -> None:
    if mode not in PROPAGATIONS:
        raise ValueError(f"unknown propagation {mode!r}; known: {list(PROPAGATIONS)}")


def set_propagation(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Set ``propagation = mode`` on every :class:`~dualflow.nn.BayesLayer` in ``model``.

    ``mode`` is one of :data:`PROPAGATIONS`: ``"moments"`` (Algorithm 1, the default),
    ``"reparam"`` (Blundell et al. 2015), ``"local"`` (Kingma et al. 2015) or ``"flipout"``
    (Wen et al. 2018). The parameters, prior and KL do not change. In a sampling mode the
    model takes and returns plain tensors (one random draw); feed it tensors, not Gaussians.

    Returns:
        ``model`` (for chaining).
    """
    _check(mode)
    for mod in model.modules():
        if isinstance(mod, BayesLayer):
            mod.propagation = mode
    return model


def get_propagation(model: torch.nn.Module) -> str | None:
    """The propagation mode shared by the model's Bayesian layers (``None`` if it has none;
    ``ValueError`` if they differ)."""
    modes = {mod.propagation for mod in model.modules() if isinstance(mod, BayesLayer)}
    if not modes:
        return None
    if len(modes) > 1:
        raise ValueError(f"the model's layers use different propagations: {sorted(modes)}")
    return modes.pop()


@contextmanager
def propagation(model: torch.nn.Module, mode: str) -> Iterator[torch.nn.Module]:
    """Context manager: ``with propagation(model, "local"): ...`` evaluates ``model`` under
    ``mode`` and restores every layer's previous mode on exit."""
    _check(mode)
    saved = [(mod, mod.propagation) for mod in model.modules() if isinstance(mod, BayesLayer)]
    try:
        yield set_propagation(model, mode)
    finally:
        for mod, m in saved:
            mod.propagation = m


@contextmanager
def mc_dropout(model: torch.nn.Module, enabled: bool = True) -> Iterator[torch.nn.Module]:
    """Context manager keeping every :class:`~dualflow.nn.Dropout` (its ``mc`` flag) and every
    ``torch.nn`` dropout module (its training flag) active in eval mode (Monte Carlo dropout),
    restoring the previous settings on exit."""
    saved = [(mod, mod.mc) for mod in model.modules() if isinstance(mod, Dropout)]
    plain = [(mod, mod.training) for mod in model.modules() if isinstance(mod, _DropoutNd)]
    try:
        for mod, _ in saved:
            mod.mc = enabled
        for mod, was in plain:
            mod.training = enabled or was
        yield model
    finally:
        for mod, m in saved:
            mod.mc = m
        for mod, was in plain:
            mod.training = was
