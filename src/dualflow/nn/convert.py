"""Convert ``torch.nn`` modules to moment-propagating ``dualflow.nn`` modules.

One explicit rule table (:data:`CONVERTERS`: ``torch.nn`` type -> converter). Anything
without a rule raises ``NotImplementedError`` naming the module: a converter must never
silently skip an operation it does not understand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dualflow.nn import activations, layers, norm, pooling, structure

__all__ = ["CONVERTERS", "from_torch"]


def _copy_affine(dst: Any, src: nn.Module) -> Any:
    with torch.no_grad():
        dst.weight_mu.copy_(src.weight)
        if getattr(src, "bias", None) is not None:
            dst.bias_mu.copy_(src.bias)
    return dst


def _linear(m: nn.Linear, **kw: Any) -> layers.Linear:
    out = layers.Linear(
        m.in_features,
        m.out_features,
        bias=m.bias is not None,
        dtype=m.weight.dtype,
        device=m.weight.device,
        **kw,
    )
    return _copy_affine(out, m)


def _conv(m: nn.Conv1d | nn.Conv2d, **kw: Any) -> Any:
    cls = layers.Conv1d if isinstance(m, nn.Conv1d) else layers.Conv2d
    if m.padding_mode != "zeros":
        raise NotImplementedError(f"{type(m).__name__} with padding_mode={m.padding_mode!r} has no rule")
    out = cls(
        m.in_channels,
        m.out_channels,
        m.kernel_size,
        m.stride,
        m.padding,
        m.dilation,
        m.groups,
        bias=m.bias is not None,
        dtype=m.weight.dtype,
        device=m.weight.device,
        **kw,
    )
    return _copy_affine(out, m)


def _bn(m: nn.BatchNorm1d | nn.BatchNorm2d, **kw: Any) -> Any:
    cls = norm.BatchNorm1d if isinstance(m, nn.BatchNorm1d) else norm.BatchNorm2d
    out = cls(m.num_features, m.eps, m.momentum if m.momentum is not None else 0.1, m.affine)
    out.load_state_dict(m.state_dict())
    out.train(m.training)
    return out


def _ln(m: nn.LayerNorm, **kw: Any) -> norm.LayerNorm:
    out = norm.LayerNorm(m.normalized_shape, m.eps, m.elementwise_affine)
    out.load_state_dict(m.state_dict())
    return out


def _maxpool(m: nn.MaxPool2d, **kw: Any) -> pooling.MaxPool2d:
    if m.dilation not in (1, (1, 1)) or m.ceil_mode:
        raise NotImplementedError("MaxPool2d with dilation or ceil_mode has no rule")
    return pooling.MaxPool2d(m.kernel_size, m.stride, m.padding)


def _avgpool(m: nn.AvgPool2d, **kw: Any) -> pooling.AvgPool2d:
    if m.ceil_mode or not m.count_include_pad or m.divisor_override is not None:
        raise NotImplementedError(
            "AvgPool2d with ceil_mode / count_include_pad=False / divisor_override has no rule"
        )
    return pooling.AvgPool2d(m.kernel_size, m.stride, m.padding)


def _adaptive(m: nn.AdaptiveAvgPool2d, **kw: Any) -> nn.Module:
    if m.output_size not in (1, (1, 1)):
        raise NotImplementedError("AdaptiveAvgPool2d is supported only with output_size 1")
    return structure.Sequential(pooling.GlobalAvgPool2d(), structure.Reshape(-1, 1, 1))


def _flatten(m: nn.Flatten, **kw: Any) -> structure.Flatten:
    return structure.Flatten(m.start_dim, m.end_dim)


def _act(name: str) -> Callable[..., nn.Module]:
    return lambda m, **kw: activations.Activation(name)


CONVERTERS: dict[type, Callable[..., nn.Module]] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.BatchNorm1d: _bn,
    nn.BatchNorm2d: _bn,
    nn.LayerNorm: _ln,
    nn.MaxPool2d: _maxpool,
    nn.AvgPool2d: _avgpool,
    nn.AdaptiveAvgPool2d: _adaptive,
    nn.Flatten: _flatten,
    nn.Identity: lambda m, **kw: structure.Identity(),
    nn.Dropout: lambda m, **kw: structure.Identity(),  # dropout is the identity at evaluation
    nn.ReLU: lambda m, **kw: activations.ReLU(),
    nn.GELU: _act("gelu"),
    nn.SiLU: _act("silu"),
    nn.Tanh: _act("tanh"),
    nn.Sigmoid: _act("sigmoid"),
    nn.ELU: _act("elu"),
    nn.Softplus: _act("softplus"),
}


def from_torch(module: nn.Module, bayes: bool = True, **layer_kwargs: Any) -> nn.Module:
    """Convert a ``torch.nn`` module tree (``Sequential`` of supported layers) to ``dualflow.nn``.

    Weight and bias values become the means of the new layers; with ``bayes=True`` the
    variances start at the layer's initial variance (see :class:`dualflow.nn.Linear`).

    Raises:
        NotImplementedError: for any module without a rule in :data:`CONVERTERS` (the error
            names it), including modules with a custom ``forward`` whose functional ops
            cannot be seen from the module tree.
    """
    if isinstance(module, nn.Sequential):
        return structure.Sequential(*[from_torch(c, bayes=bayes, **layer_kwargs) for c in module])
    rule = CONVERTERS.get(type(module))
    if rule is None:
        raise NotImplementedError(
            f"no moment-propagation rule for {type(module).__module__}.{type(module).__name__}; "
            f"supported: {sorted(t.__name__ for t in CONVERTERS)} inside nn.Sequential"
        )
    if rule in (_linear, _conv):
        return rule(module, bayes=bayes, **layer_kwargs)
    return rule(module)
