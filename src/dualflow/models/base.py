"""The model wrapper every architecture returns."""

from __future__ import annotations

from typing import Any

import torch

from dualflow.gaussian import Gaussian, check_gaussian
from dualflow.nn.base import Input, Module, check_dtype, set_checks

__all__ = ["ImageClassifier"]


class ImageClassifier(Module):
    """An image classifier ``(B, C, H, W) -> (B, num_classes)`` logits (moments or tensor).

    Input checking is done once, here at the boundary: floating point and of the parameters'
    dtype (always; free), shape ``(B, in_channels, image_size, image_size)`` (always; free) and,
    while ``check_inputs`` is on (the default), finite values and non-negative variances (one
    device synchronisation). The per-layer checks of the inner :mod:`dualflow.nn` modules would
    repeat that test at every layer, a synchronisation each, so the wrapper sets them as
    ``layer_checks`` says: off by default, and this is the wrapper's one effect on ``body``.
    Pass ``layer_checks=True`` (or set ``model.layer_checks = True``, or call
    ``dualflow.nn.set_checks(model, True)``) to validate every layer's input while debugging;
    ``print(model)`` shows the setting.

    Attributes:
        arch: registry name the model was created under.
        config: the keyword arguments that rebuild it: ``dualflow.models.create(**model.config)``.
        body: the network (a :class:`dualflow.nn.Sequential`).
        layer_checks: whether the inner modules validate their inputs (a property over ``body``).
    """

    def __init__(
        self,
        body: torch.nn.Module,
        *,
        arch: str,
        num_classes: int,
        in_channels: int,
        image_size: int,
        normalization: str,
        bayes: bool,
        config: dict[str, Any],
        layer_checks: bool = False,
    ) -> None:
        super().__init__()
        self.body = body
        self.arch = arch
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.normalization = normalization
        self.bayes = bool(bayes)
        self.config = dict(config)
        self.layer_checks = layer_checks

    @property
    def layer_checks(self) -> bool:
        """``True`` if any module inside ``body`` validates its inputs (see the class docstring)."""
        return any(m.check_inputs for m in self.body.modules() if isinstance(m, Module))

    @layer_checks.setter
    def layer_checks(self, enabled: bool) -> None:
        set_checks(self.body, bool(enabled))

    def forward(self, x: Input) -> Input:
        m = x.mean if isinstance(x, Gaussian) else x
        if not isinstance(m, torch.Tensor):
            raise TypeError(
                f"{self.arch}: expected a torch.Tensor or dualflow.Gaussian, got {type(x).__name__}"
            )
        want = (self.in_channels, self.image_size, self.image_size)
        if m.dim() != 4 or tuple(m.shape[1:]) != want:
            raise ValueError(
                f"{self.arch}: expected images of shape (B, {want[0]}, {want[1]}, {want[2]}), got "
                f"{tuple(m.shape)} (create the model with in_channels= / image_size= matching the data)"
            )
        if not m.is_floating_point():
            raise TypeError(
                f"{self.arch}: expected floating-point images, got {m.dtype} (normalise uint8 images first, "
                "e.g. with ImageData.normalize)"
            )
        p = next(self.parameters(), None)
        check_dtype(m, None if p is None else p.dtype, self.arch)
        if self.check_inputs:
            check_gaussian(x, f"{self.arch} input")
        return self.body(x)

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, num_classes={self.num_classes}, in_channels={self.in_channels}, "
            f"image_size={self.image_size}, normalization={self.normalization!r}, bayes={self.bayes}, "
            f"check_inputs={self.check_inputs}, layer_checks={self.layer_checks}"
        )
