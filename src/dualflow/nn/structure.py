"""Containers and structural / binary operations on Gaussians."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dualflow import rules
from dualflow.gaussian import Gaussian, add_independent, cat, check_gaussian
from dualflow.nn.base import Input, Module, check_dtype, pack, split_input

__all__ = ["Add", "Concat", "Flatten", "Identity", "Product", "Reshape", "Residual", "Sequential"]


class Sequential(Module, torch.nn.Sequential):
    """Moment-propagating ``Sequential``: each child maps ``Gaussian -> Gaussian``.

    With ``check_inputs`` the input is validated once (dtype, NaN/inf, negative variances).
    """

    def forward(self, x: Input) -> Input:  # type: ignore[override]
        if self.check_inputs:
            if len(self) and isinstance(self[0], Module):  # a torch module first (an Embedding) may want ints
                p = next(self.parameters(), None)
                check_dtype(split_input(x)[0], None if p is None else p.dtype, "Sequential")
            check_gaussian(x, "Sequential input")
        for module in self:
            x = module(x)
        return x


class Identity(Module):
    def forward(self, x: Input) -> Input:
        return x


class Flatten(Module):
    """Flatten dims ``start_dim..end_dim`` of mean and variance (exact)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x: Input) -> Input:
        m, v = split_input(x)
        return pack(
            m.flatten(self.start_dim, self.end_dim),
            None if v is None else v.flatten(self.start_dim, self.end_dim),
        )


class Reshape(Module):
    """Reshape the non-batch dims to ``shape`` (exact)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Input) -> Input:
        m, v = split_input(x)
        s = (m.shape[0], *self.shape)
        return pack(m.reshape(s), None if v is None else v.reshape(s))


def _add(a: Input, b: Input) -> Input:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a + b
    return add_independent(a, b)


class Add(Module):
    """Sum of two inputs treated as *independent*: ``(m1 + m2, v1 + v2)``.

    In a residual block ``x + f(x)`` the two terms are correlated; moment propagation
    ignores that correlation (an approximation, as in the paper).
    """

    def forward(self, a: Input, b: Input) -> Input:  # type: ignore[override]
        ma, mb = split_input(a)[0], split_input(b)[0]
        if ma.shape != mb.shape:
            raise ValueError(f"Add: shapes differ: {tuple(ma.shape)} vs {tuple(mb.shape)}")
        return _add(a, b)


class Residual(Module):
    """``block(x) + shortcut(x)`` (identity shortcut by default), summed as independent."""

    def __init__(self, block: torch.nn.Module, shortcut: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.block = block
        self.shortcut = shortcut if shortcut is not None else Identity()

    def forward(self, x: Input) -> Input:
        return _add(self.block(x), self.shortcut(x))


class Concat(Module):
    """Concatenate inputs along ``dim`` (exact), e.g. DenseNet feature maps."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, xs: Sequence[Input]) -> Input:  # type: ignore[override]
        if all(isinstance(x, Tensor) for x in xs):
            return torch.cat(list(xs), self.dim)
        return cat(xs, self.dim)


class Product(Module):
    """Element-wise product of two *independent* Gaussians (exact under independence):
    ``(mx my, mx^2 vy + my^2 vx + vx vy)``; e.g. squeeze-and-excite gates."""

    def forward(self, a: Input, b: Input) -> Input:  # type: ignore[override]
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            return a * b
        ga = a if isinstance(a, Gaussian) else Gaussian.deterministic(a)
        gb = b if isinstance(b, Gaussian) else Gaussian.deterministic(b)
        return Gaussian(*rules.product(ga.mean, ga.var, gb.mean, gb.var))


class AddNoise(Module):
    """Additive independent Gaussian noise ``x + e``, ``e ~ N(0, noise_var)``: ``(m, v + noise_var)``.

    Exact. With point-weight ``Linear`` layers it builds the Gaussian-linear networks of
    the paper's Eq. 3 (``x_l = W x_{l-1} + omega_l``).
    """

    def __init__(self, noise_var: float | Tensor) -> None:
        super().__init__()
        # float64 so that converting the model to float64 loses nothing
        nv = torch.as_tensor(noise_var, dtype=torch.float64)
        if not bool((nv > 0).all()) or not bool(torch.isfinite(nv).all()):
            raise ValueError(f"AddNoise: noise_var must be positive and finite, got {noise_var}")
        self.register_buffer("noise_var", nv)

    def forward(self, x: Input) -> Input:
        m, v = split_input(x)
        nv = self.noise_var.to(m.dtype)
        return Gaussian(m, nv.expand_as(m) if v is None else v + nv)
