"""Building blocks shared by the architectures, all made of :mod:`dualflow.nn` parts.

The few operations :mod:`dualflow.nn` does not have are defined here as small
:class:`dualflow.nn.Module` subclasses. Every one maps a plain tensor to a plain tensor
(the point network costs what ``torch.nn`` costs) and a :class:`dualflow.Gaussian` to a
Gaussian, and every one is *exact* on moments (a deterministic scale, a permutation,
zero padding, an average) except where its docstring says otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from dualflow import nn as dnn
from dualflow import ops, rules
from dualflow.nn.base import Input, Module, pack, split_input

__all__ = [
    "ACT_GAINS",
    "ChannelPadShortcut",
    "DenseLayer",
    "LayerFactory",
    "Scale",
    "SqueezeExcite",
    "TokenMean",
    "Transpose",
    "Unsqueeze2d",
    "finish_skip_gains",
]


class _Gains(Mapping[str, float]):
    """Read-only view ``activation name -> gain`` of the op table (:func:`dualflow.ops.gain`)."""

    def __getitem__(self, name: str) -> float:
        try:
            return ops.gain(name)
        except ops.UnsupportedOpError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(ops.activation_names())

    def __len__(self) -> int:
        return len(ops.activation_names())


#: Initialisation gains ``1 / sqrt(E[f(z)^2])``, ``z ~ N(0, 1)``, of every activation of the op
#: table (``"linear"``: 1): with them the weight second-moment rule of
#: :class:`dualflow.nn.BayesLayer` keeps ``E[x^2]`` of the pre-activations constant from layer
#: to layer at initialisation (He et al. 2015 for ReLU, the same computation for the others).
ACT_GAINS: Mapping[str, float] = _Gains()


class Scale(Module):
    """Multiply by a scalar ``a``: ``(a m, a^2 v)``. Exact.

    With ``learnable=True`` ``a`` is a (point) parameter, e.g. the SkipInit / ReZero
    residual gain initialised at 0; otherwise a fixed buffer (e.g. the factor 2 of the
    normalisation-free squeeze-excite gate).
    """

    def __init__(self, init: float = 0.0, learnable: bool = True) -> None:
        super().__init__()
        t = torch.tensor(float(init))
        if learnable:
            self.scale = torch.nn.Parameter(t)
        else:
            self.register_buffer("scale", t)
        self.learnable = bool(learnable)

    def forward(self, x: Input) -> Input:
        m, v = split_input(x)
        a = self.scale.to(m.dtype)
        return pack(m * a, None if v is None else v * (a * a))

    def extra_repr(self) -> str:
        return f"init={float(self.scale.detach()):g}, learnable={self.learnable}"


class ChannelPadShortcut(Module):
    """ResNet "option A" shortcut (He et al. 2016, CIFAR): spatial subsampling by ``stride``
    and zero channels padded on both sides up to ``out_channels``. Parameter-free and exact
    on moments (a selection of entries plus constant zeros with variance 0)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option-A shortcut cannot shrink channels ({in_channels} -> {out_channels})")
        self.in_channels, self.out_channels, self.stride = int(in_channels), int(out_channels), int(stride)
        extra = self.out_channels - self.in_channels
        self._pad = (extra // 2, extra - extra // 2)

    def _select(self, t: Tensor) -> Tensor:
        s = self.stride
        t = t[:, :, ::s, ::s]
        if self._pad != (0, 0):
            t = torch.nn.functional.pad(t, (0, 0, 0, 0, *self._pad))
        return t

    def forward(self, x: Input) -> Input:
        m, v = split_input(x)
        return pack(self._select(m), None if v is None else self._select(v))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class Transpose(Module):
    """Swap two axes of mean and variance (exact), e.g. tokens <-> channels in MLP-Mixer."""

    def __init__(self, dim0: int, dim1: int) -> None:
        super().__init__()
        self.dim0, self.dim1 = int(dim0), int(dim1)

    def forward(self, x: Input) -> Input:
        m, v = split_input(x)
        return pack(
            m.transpose(self.dim0, self.dim1), None if v is None else v.transpose(self.dim0, self.dim1)
        )

    def extra_repr(self) -> str:
        return f"{self.dim0}, {self.dim1}"


class TokenMean(Module):
    """Average over axis ``dim`` of ``k`` entries: ``(mean(m), mean(v) / k)`` (exact under the
    mean-field independence of the entries, as :class:`dualflow.nn.GlobalAvgPool2d`)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = int(dim)

    def forward(self, x: Input) -> Input:
        m, v = split_input(x)
        mean, var = rules.global_avg_pool(m, v, (self.dim,))
        return pack(mean, var)


class Unsqueeze2d(Module):
    """``(B, C) -> (B, C, 1, 1)`` (exact)."""

    def forward(self, x: Input) -> Input:
        m, v = split_input(x)
        return pack(m[:, :, None, None], None if v is None else v[:, :, None, None])


class SqueezeExcite(Module):
    """Squeeze-and-excitation (Hu et al. 2018) as in EfficientNet: ``x * gate(x)`` with
    ``gate = sigmoid(W2 silu(W1 GAP(x)))``, one gate per channel.

    The product uses :class:`dualflow.nn.Product`, i.e. it treats ``x`` and ``gate(x)`` as
    independent (an approximation: the gate is computed from ``x``). ``gate_scale`` multiplies
    the gate (2 in the normalisation-free variant, as NF-Nets, Brock et al. 2021, so that the
    gate is 1 rather than 1/2 on average at initialisation and the signal is not halved in
    every block).
    """

    def __init__(self, channels: int, reduced: int, make: LayerFactory, gate_scale: float = 1.0) -> None:
        super().__init__()
        self.pool = dnn.GlobalAvgPool2d()
        self.reduce = make.linear(channels, reduced, bias=True, gain=1.0)
        self.act = make.act("silu")
        self.expand = make.linear(reduced, channels, bias=True, gain=ACT_GAINS["silu"])
        self.gate = dnn.Sigmoid()
        self.gate_scale = Scale(gate_scale, learnable=False) if gate_scale != 1.0 else dnn.Identity()
        self.unsqueeze = Unsqueeze2d()
        self.product = dnn.Product()

    def forward(self, x: Input) -> Input:
        g = self.pool(x)
        g = self.expand(self.act(self.reduce(g)))
        g = self.unsqueeze(self.gate_scale(self.gate(g)))
        return self.product(x, g)


class DenseLayer(Module):
    """``x -> concat([x, f(x)], channels)`` (DenseNet connectivity; the concatenation is exact)."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block
        self.cat = dnn.Concat(dim=1)

    def forward(self, x: Input) -> Input:
        return self.cat([x, self.block(x)])


class LayerFactory:
    """Creates the layers of one network with shared settings.

    Args:
        bayes: mean-field Gaussian weights (``True``) or point weights.
        normalization: ``"none"`` or ``"batch"`` (``norm2d``/``norm1d`` give ``Identity`` for
            ``"none"``); ``"layer"`` is accepted by the architectures that use LayerNorm.
        init_var_ratio, prior_var: passed to every :class:`dualflow.nn.BayesLayer`.
        dropout: dropout rate for :meth:`dropout` (needs ``dualflow.nn.Dropout``).
        act_method: moment rule of smooth activations (``"gh"`` or ``"taylor"``).
    """

    def __init__(
        self,
        bayes: bool,
        normalization: str,
        init_var_ratio: float = 0.01,
        prior_var: float | None = None,
        dropout: float = 0.0,
        act_method: str = "gh",
    ) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.bayes = bool(bayes)
        self.normalization = normalization
        self.init_var_ratio = float(init_var_ratio)
        self.prior_var = prior_var
        self.dropout_rate = float(dropout)
        self.act_method = act_method

    @property
    def normalized(self) -> bool:
        return self.normalization != "none"

    def _kw(self, gain: float) -> dict[str, Any]:
        return {
            "bayes": self.bayes,
            "prior_var": self.prior_var,
            "init_var_ratio": self.init_var_ratio,
            "gain": gain,
        }

    def conv(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        bias: bool | None = None,
        gain: float = ACT_GAINS["relu"],
    ) -> dnn.Conv2d:
        """A ``kernel x kernel`` convolution with "same" padding by default; with ``bias=None`` a
        bias only in the normalisation-free variant (a following BatchNorm makes it redundant)."""
        if padding is None:
            padding = (kernel - 1) // 2
        if bias is None:
            bias = not self.normalized
        return dnn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=bias, **self._kw(gain))

    def linear(self, fin: int, fout: int, bias: bool = True, gain: float = ACT_GAINS["relu"]) -> dnn.Linear:
        return dnn.Linear(fin, fout, bias=bias, **self._kw(gain))

    def norm2d(self, c: int) -> torch.nn.Module:
        return dnn.BatchNorm2d(c) if self.normalized else dnn.Identity()

    def norm1d(self, c: int) -> torch.nn.Module:
        return dnn.BatchNorm1d(c) if self.normalized else dnn.Identity()

    def act(self, name: str = "relu") -> torch.nn.Module:
        """The activation ``name`` of the op table: its closed-form moments where it has them,
        else the factory's ``act_method`` (Gauss-Hermite or Taylor)."""
        try:
            op = ops.activation(name)
        except ops.UnsupportedOpError as e:
            raise ValueError(str(e)) from None
        return dnn.Activation(op.name, method="closed" if op.closed is not None else self.act_method)

    def dropout(self, p: float | None = None) -> torch.nn.Module:
        """``dualflow.nn.Dropout(p)`` where the rate is > 0, else ``Identity``.

        Raises ``NotImplementedError`` for a positive rate while :mod:`dualflow.nn` has no
        ``Dropout`` module (looked up at build time, so nothing here depends on it).
        """
        p = self.dropout_rate if p is None else p
        if p <= 0.0:
            return dnn.Identity()
        cls = getattr(dnn, "Dropout", None)
        if cls is None:
            raise NotImplementedError(
                f"dropout={p} needs dualflow.nn.Dropout, which this version does not provide; use dropout=0"
            )
        return cls(p)

    def skip_scale(self, init: float | None) -> torch.nn.Module:
        """The learnable residual-branch gain of the normalisation-free variant; ``Identity`` in
        the normalised variant. ``None`` is a placeholder set by :func:`finish_skip_gains`."""
        return Scale(0.0 if init is None else init) if not self.normalized else dnn.Identity()


def finish_skip_gains(body: torch.nn.Module, skip_init: float | None) -> torch.nn.Module:
    """Set the initial residual-branch gains of a normalisation-free network.

    ``skip_init=None`` (the default of every residual architecture): every learnable
    :class:`Scale` gets ``1 / sqrt(L)``, ``L`` the number of residual branches, so the second
    moment of the residual stream grows by at most a factor ``(1 + c/L)^L <= e^c`` over the
    whole network whatever its depth (the ``1/sqrt(L)`` branch scaling of Stable ResNet,
    Hayou et al. 2021). A number sets every gain to it (0: SkipInit exactly). Returns ``body``.
    """
    if skip_init is None:
        gains = [m for m in body.modules() if isinstance(m, Scale) and m.learnable]
        with torch.no_grad():
            for g in gains:
                g.scale.fill_(len(gains) ** -0.5)
    return body
