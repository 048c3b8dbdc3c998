"""Pooling on Gaussian feature maps ``(B, C, H, W)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dualflow import rules
from dualflow.gaussian import Gaussian
from dualflow.nn.base import Input, Module, split_input
from dualflow.nn.layers import Conv2d

__all__ = ["AvgPool2d", "GlobalAvgPool2d", "MaxPool2d", "conv_window_corr", "set_max_pool"]


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def _check_4d(name: str, x: Input) -> None:
    m = x.mean if isinstance(x, Gaussian) else x
    if m.dim() != 4:
        raise ValueError(f"{name}: expected a (B, C, H, W) input, got shape {tuple(m.shape)}")


_MAX_METHODS = ("clark", "quad", "lse")
_CORRELATIONS = ("smooth", "meanfield", "none")


class MaxPool2d(Module):
    """Max pooling of Gaussian activations.

    Args:
        kernel_size, stride, padding: as :class:`torch.nn.MaxPool2d` (``stride`` defaults to
            ``kernel_size``); padded positions never win the max.
        method: the moment rule of the max of a window.
            ``"clark"`` (default): Clark's (1961) pairwise maxima, each intermediate max
            treated as Gaussian; with the window's correlations where they are known (see
            ``correlation``), else a tree of independent pairwise maxima (exact for a window
            of 2; up to 15% (median 4%) variance error for a 2x2 window of similar
            independent Gaussians, 50% when their variances differ 100x).
            ``"quad"``: exact moments of the max of *independent* Gaussians by adaptive
            quadrature (:func:`dualflow.rules.max_pool2d_quad`; < 1% error, ~10x the cost;
            ignores correlations).
            ``"lse"``: the paper's smooth max ``T logsumexp(x/T)`` with first-order variance.
        correlation: where the pool follows a :class:`~dualflow.nn.Conv2d` inside a
            :class:`~dualflow.nn.Sequential` (with only BatchNorm / Identity between them),
            the container passes the covariances the convolution implies between the
            elements of each window (weights are shared across positions, so neighbouring
            pre-activations are strongly correlated under weight noise; assuming them
            independent biases the mean of the max upwards by 0.2-0.5 output sd, measured).
            ``"smooth"`` (default) or ``"meanfield"``: the model of
            :func:`dualflow.rules.conv2d_window_cov`; ``"none"``: always independent.
            Used by ``method="clark"`` only. Cost: where the windows tile the map (the usual
            2x2 with stride 2), one strided convolution per pair of window elements and one
            convolution of the input variance, about 2.2x the moment convolution feeding the
            pool; overlapping or padded windows: one full convolution per displacement
            (:attr:`window_offsets`). :func:`set_max_pool` switches a whole model.
        temperature: ``T`` for ``"lse"``.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
        method: str = "clark",
        temperature: float = 0.1,
        correlation: str = "smooth",
    ) -> None:
        super().__init__()
        if method not in _MAX_METHODS:
            raise ValueError(f"MaxPool2d: method must be one of {_MAX_METHODS}, got {method!r}")
        if correlation not in _CORRELATIONS:
            raise ValueError(f"MaxPool2d: correlation must be one of {_CORRELATIONS}, got {correlation!r}")
        if temperature <= 0:
            raise ValueError(f"MaxPool2d: temperature must be > 0, got {temperature}")
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride) if stride is not None else self.kernel_size
        self.padding = _pair(padding)
        self.method, self.temperature = method, float(temperature)
        self.correlation = correlation

    @property
    def window_offsets(self) -> tuple[tuple[int, int], ...]:
        """Displacements between elements of one window (:func:`dualflow.rules.window_offsets`)."""
        return rules.window_offsets(self.kernel_size)

    @property
    def tiles(self) -> bool:
        """Windows tile the map (``stride == kernel_size``, no padding): the fast correlation path."""
        return self.stride == self.kernel_size and self.padding == (0, 0)

    @property
    def wants_correlation(self) -> bool:
        """Whether this pool uses window correlations when a container supplies them."""
        return self.method == "clark" and self.correlation != "none"

    def forward(self, x: Input, window_corr: Tensor | None = None) -> Input:
        """Pool ``x``. ``window_corr``: ``None`` for independent elements, else the correlations
        within the windows as :func:`conv_window_corr` returns them: per pair of window
        elements, ``(B, C, n_pairs, H_out, W_out)`` (:func:`dualflow.rules.pair_corr`) where
        the windows tile the map (:attr:`tiles`); otherwise per element and displacement,
        ``(B, len(window_offsets), C, H, W)`` (:func:`dualflow.rules.window_corr`)."""
        _check_4d("MaxPool2d", x)
        if isinstance(x, Tensor):
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        m, v = x
        geom = (self.kernel_size, self.stride, self.padding)
        if self.method == "clark":
            if window_corr is not None and self.correlation != "none":
                if self.tiles:
                    return Gaussian(*rules.max_pool2d_clark_pairs(m, v, window_corr, self.kernel_size))
                return Gaussian(*rules.max_pool2d_clark_corr(m, v, window_corr, self.window_offsets, *geom))
            return Gaussian(*rules.max_pool2d_clark(m, v, *geom))
        if self.method == "quad":
            return Gaussian(*rules.max_pool2d_quad(m, v, *geom))
        return Gaussian(*rules.max_pool2d_lse(m, v, *geom, self.temperature))

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"method={self.method!r}, correlation={self.correlation!r}"
        )


def set_max_pool(
    model: torch.nn.Module, *, method: str | None = None, correlation: str | None = None
) -> torch.nn.Module:
    """Set ``method`` and/or ``correlation`` of every :class:`MaxPool2d` in ``model``; returns it.

    E.g. ``set_max_pool(model, correlation="none")`` trades the window correlations (the mean
    of the pooled moments) for speed.
    """
    if method is not None and method not in _MAX_METHODS:
        raise ValueError(f"set_max_pool: method must be one of {_MAX_METHODS}, got {method!r}")
    if correlation is not None and correlation not in _CORRELATIONS:
        raise ValueError(f"set_max_pool: correlation must be one of {_CORRELATIONS}, got {correlation!r}")
    for mod in model.modules():
        if isinstance(mod, MaxPool2d):
            if method is not None:
                mod.method = method
            if correlation is not None:
                mod.correlation = correlation
    return model


def conv_window_corr(conv: Module, x: Input, out: Input, pool: MaxPool2d) -> Tensor | None:
    """Correlations between the elements of ``pool``'s windows on the output ``out = conv(x)``.

    Pair correlations (:func:`dualflow.rules.conv2d_pair_cov`) where the pool's windows tile
    the map, else per displacement (:func:`dualflow.rules.conv2d_window_cov`).
    ``conv`` must be a :class:`~dualflow.nn.Conv2d` in ``"moments"`` propagation; returns
    ``None`` (independent elements) when ``out`` is deterministic, the pool does not use
    correlations, or the layer is not a moment-propagating 2-d convolution.
    """
    if not (isinstance(conv, Conv2d) and isinstance(out, Gaussian) and pool.wants_correlation):
        return None
    if conv.propagation != "moments":
        return None
    m, v = split_input(x)
    w_m, w_v, _, b_v = conv._moments()
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    if pool.tiles:
        cov = rules.conv2d_pair_cov(m, v, w_m, w_v, b_v, pool.kernel_size, mode=pool.correlation, **kw)
        return None if cov is None else rules.pair_corr(cov, out.var, pool.kernel_size)
    offsets = pool.window_offsets
    cov = rules.conv2d_window_cov(m, v, w_m, w_v, b_v, offsets, mode=pool.correlation, **kw)
    return None if cov is None else rules.window_corr(cov, out.var, offsets)


class AvgPool2d(Module):
    """Average pooling: ``(avgpool(m), avgpool(v) / k)`` (exact; zero padding counts in ``k``)."""

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride) if stride is not None else self.kernel_size
        self.padding = _pair(padding)

    def forward(self, x: Input) -> Input:
        _check_4d("AvgPool2d", x)
        m, v = split_input(x)
        mean, var = rules.avg_pool2d(m, v, self.kernel_size, self.stride, self.padding)
        return mean if var is None else Gaussian(mean, var)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class GlobalAvgPool2d(Module):
    """Mean over all ``k = H W`` positions: ``(B, C, H, W) -> (B, C)``, variance ``mean(v)/k``. Exact."""

    def forward(self, x: Input) -> Input:
        _check_4d("GlobalAvgPool2d", x)
        m, v = split_input(x)
        mean, var = rules.global_avg_pool(m, v, (-2, -1))
        return mean if var is None else Gaussian(mean, var)
