"""The distribution of an activation tensor: element-wise independent Gaussians.

:class:`Gaussian` is a ``typing.NamedTuple`` of two tensors of the same shape, ``mean`` and
``var``. Being a tuple it is a pytree for ``torch.func``/``torch.compile`` and can be
unpacked (``m, v = g``). Structural operations (reshape, flatten, indexing, padding,
concatenation, permutation) act on both parts identically; they are exact because they
only move elements around.

Arithmetic operators are disabled on purpose: ``g1 + g2`` on a tuple would silently
concatenate. Use :func:`add_independent` (which states its independence assumption) or
the ``dualflow.nn`` modules instead.

Validation. Constructing ``Gaussian(mean, var)`` checks the shapes (two tensors of one
shape), which costs no device synchronisation, so it stays on in every layer's hot path.
The *values* (no NaN/inf, ``var >= 0``) need a synchronisation each, so they are checked
where a Gaussian enters the library: the layers and containers (``check_inputs``), the
losses, :func:`dualflow.losses.predictive_mean_var`, or on demand with
:meth:`Gaussian.checked` / :func:`check_gaussian`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["Gaussian", "add_independent", "as_gaussian", "cat", "check_gaussian", "stack"]


class _Moments(NamedTuple):
    mean: Tensor
    var: Tensor


class Gaussian(_Moments):
    """Element-wise independent Gaussian ``N(mean, var)`` over a tensor.

    Attributes:
        mean: tensor of any shape ``S``.
        var: tensor of shape ``S``, ``var >= 0`` (variances, not standard deviations).

    Raises:
        ValueError: ``mean`` and ``var`` are tensors of different shapes (checked on every
            construction; free). Use :meth:`checked` to also check the values.
    """

    __slots__ = ()

    def __new__(cls, mean: Tensor, var: Tensor) -> Gaussian:
        # pytree code (vmap's out_dims) rebuilds the tuple from non-tensor leaves: only tensors are checked
        if isinstance(mean, Tensor) and isinstance(var, Tensor) and mean.shape != var.shape:
            raise ValueError(
                f"Gaussian: mean and variance shapes differ: {tuple(mean.shape)} vs {tuple(var.shape)} "
                "(broadcast them explicitly, e.g. var.expand_as(mean))"
            )
        return tuple.__new__(cls, (mean, var))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def deterministic(cls, x: Tensor) -> Gaussian:
        """A point mass at ``x`` (variance 0)."""
        return cls(x, torch.zeros_like(x))

    @classmethod
    def checked(cls, mean: Tensor, var: Tensor, name: str = "Gaussian") -> Gaussian:
        """``Gaussian(mean, var)`` after :func:`check_gaussian`: same shapes and dtypes, no NaN/inf,
        ``var >= 0`` (one device synchronisation). For user code at the API boundary."""
        if not isinstance(mean, Tensor) or not isinstance(var, Tensor):
            got = f"{type(mean).__name__}, {type(var).__name__}"
            raise TypeError(f"{name}: mean and var must be tensors, got {got}")
        g = cls(mean, var)
        check_gaussian(g, name)
        return g

    # ------------------------------------------------------------------ tensor-like info
    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def dim(self) -> int:
        return self.mean.dim()

    def size(self, dim: int | None = None) -> Any:
        return self.mean.size() if dim is None else self.mean.size(dim)

    @property
    def std(self) -> Tensor:
        """Standard deviation ``sqrt(var)``."""
        return self.var.sqrt()

    # ------------------------------------------------------------------ structural ops
    def reshape(self, *shape: Any) -> Gaussian:
        return Gaussian(self.mean.reshape(*shape), self.var.reshape(*shape))

    def view(self, *shape: Any) -> Gaussian:
        return Gaussian(self.mean.view(*shape), self.var.view(*shape))

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> Gaussian:
        return Gaussian(self.mean.flatten(start_dim, end_dim), self.var.flatten(start_dim, end_dim))

    def permute(self, *dims: int) -> Gaussian:
        return Gaussian(self.mean.permute(*dims), self.var.permute(*dims))

    def transpose(self, dim0: int, dim1: int) -> Gaussian:
        return Gaussian(self.mean.transpose(dim0, dim1), self.var.transpose(dim0, dim1))

    def squeeze(self, dim: int) -> Gaussian:
        return Gaussian(self.mean.squeeze(dim), self.var.squeeze(dim))

    def unsqueeze(self, dim: int) -> Gaussian:
        return Gaussian(self.mean.unsqueeze(dim), self.var.unsqueeze(dim))

    def contiguous(self) -> Gaussian:
        return Gaussian(self.mean.contiguous(), self.var.contiguous())

    def pad(self, pad: Sequence[int], value: float = 0.0) -> Gaussian:
        """Constant padding (``torch.nn.functional.pad``); the padded entries are exactly ``value``
        (variance 0)."""
        f = torch.nn.functional.pad
        return Gaussian(f(self.mean, tuple(pad), value=value), f(self.var, tuple(pad), value=0.0))

    def to(self, *args: Any, **kwargs: Any) -> Gaussian:
        return Gaussian(self.mean.to(*args, **kwargs), self.var.to(*args, **kwargs))

    def detach(self) -> Gaussian:
        return Gaussian(self.mean.detach(), self.var.detach())

    def at(self, key: Any) -> Gaussian:
        """Tensor indexing on both parts: ``g.at(key)`` is ``Gaussian(mean[key], var[key])``.

        ``g[i]`` keeps tuple semantics (``g[0]`` is the mean), so indexing of the
        underlying tensors has its own name.
        """
        return Gaussian(self.mean[key], self.var[key])

    # ------------------------------------------------------------------ guards
    def __add__(self, other: object) -> Any:  # type: ignore[override]
        raise TypeError(
            "Gaussian + ... is ambiguous (tuple concatenation or sum of random variables). "
            "Use dualflow.gaussian.add_independent(a, b) or dualflow.nn.Add for the sum of "
            "independent Gaussians, or dualflow.gaussian.cat for concatenation."
        )

    __radd__ = __add__

    def __mul__(self, other: object) -> Any:  # type: ignore[override]
        raise TypeError(
            "Gaussian * ... is not defined. Use dualflow.rules.product for the product of "
            "independent Gaussians or dualflow.rules.scale for a constant factor."
        )

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"Gaussian(shape={tuple(self.mean.shape)}, dtype={self.mean.dtype}, device={self.mean.device})"


def as_gaussian(x: Tensor | Gaussian) -> Gaussian:
    """Return ``x`` as a :class:`Gaussian`; a plain tensor is a point mass (variance 0)."""
    if isinstance(x, Gaussian):
        return x
    if isinstance(x, Tensor):
        return Gaussian.deterministic(x)
    if isinstance(x, tuple) and len(x) == 2 and all(isinstance(t, Tensor) for t in x):
        return Gaussian(*x)
    raise TypeError(f"expected a torch.Tensor or dualflow.Gaussian, got {type(x).__name__}")


def check_gaussian(x: Tensor | Gaussian, name: str = "input") -> None:
    """Raise ``ValueError`` if ``x`` is not a valid Gaussian.

    Checks: mean and variance have the same shape and dtype; no NaN/inf in either; variance >= 0.
    One device synchronisation.
    """
    if isinstance(x, Tensor):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf values")
        return
    if not isinstance(x, Gaussian):
        raise TypeError(f"{name}: expected a torch.Tensor or dualflow.Gaussian, got {type(x).__name__}")
    m, v = x
    if m.shape != v.shape:
        raise ValueError(f"{name}: mean and variance shapes differ: {tuple(m.shape)} vs {tuple(v.shape)}")
    if m.dtype != v.dtype:
        raise ValueError(f"{name}: mean and variance dtypes differ: {m.dtype} vs {v.dtype}")
    ok_m, ok_v, ok_pos = torch.stack(
        [torch.isfinite(m).all(), torch.isfinite(v).all(), (v >= 0).all()]
    ).tolist()
    if not ok_m:
        raise ValueError(f"{name}: the mean contains NaN or inf values")
    if not ok_v:
        raise ValueError(f"{name}: the variance contains NaN or inf values")
    if not ok_pos:
        raise ValueError(f"{name}: the variance has negative entries (variances must be >= 0)")


def cat(xs: Sequence[Tensor | Gaussian], dim: int = 0) -> Gaussian:
    """Concatenate Gaussians (or tensors, treated as point masses) along ``dim``. Exact."""
    gs = [as_gaussian(x) for x in xs]
    return Gaussian(torch.cat([g.mean for g in gs], dim), torch.cat([g.var for g in gs], dim))


def stack(xs: Sequence[Tensor | Gaussian], dim: int = 0) -> Gaussian:
    """Stack Gaussians along a new axis ``dim``. Exact."""
    gs = [as_gaussian(x) for x in xs]
    return Gaussian(torch.stack([g.mean for g in gs], dim), torch.stack([g.var for g in gs], dim))


def add_independent(a: Tensor | Gaussian, b: Tensor | Gaussian) -> Gaussian:
    """Sum of two *independent* Gaussians: ``N(m1 + m2, v1 + v2)``.

    Exact if the inputs are independent. A residual connection ``x + f(x)`` violates
    this (``f(x)`` depends on ``x``); moment propagation accepts that approximation, as
    the paper does.
    """
    ga, gb = as_gaussian(a), as_gaussian(b)
    return Gaussian(ga.mean + gb.mean, ga.var + gb.var)
