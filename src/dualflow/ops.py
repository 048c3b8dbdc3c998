"""The op table: every operation dualflow propagates moments through, in one registry.

Each :class:`Op` maps an operation, in every form it takes in PyTorch code (a ``torch.nn``
module class, ``torch`` / ``torch.nn.functional`` functions, ``operator`` functions, tensor
method names), to its moment rule and its properties:

* ``elementwise``: acts on each entry alone (its rule is a closed form or Gauss-Hermite
  quadrature of the point function ``fn``);
* ``monotone``: non-decreasing (element-wise ops); then ``max(f(a), f(b)) = f(max(a, b))``,
  which the converters use to pool pre-activations (docs/maths.md section 1.3);
* ``linear``: an affine map of its input, so its moments are exact whatever the input
  distribution;
* ``gain``: the initialisation gain ``1 / sqrt(E[f(z)^2])``, ``z ~ N(0, 1)`` (``sqrt 2`` for
  ReLU, He et al. 2015), which keeps the second moment of pre-activations constant;
* ``exact``: whether the rule is exact under the mean-field assumption (inputs with
  independent entries, independent operands); ``rule`` says what it does and, if not exact,
  which approximation it makes.

The layers (:class:`dualflow.nn.Activation`), the model builders
(:class:`dualflow.models.LayerFactory`, :func:`dualflow.methods.mlp_builder`) and both
converters (:func:`dualflow.nn.from_torch`, :func:`dualflow.convert`) read this table and
nothing else; adding an activation is one :func:`_unary` entry in :data:`OPS` plus its
test. Look an op up with :func:`get` (by name), :func:`lookup` (a module, module class,
function or operator) or :func:`lookup_method` (a tensor method name).

Values: every ``Op`` is callable on *values*, with the signature of its functional form
(``OPS["relu"](x)``, ``OPS["cat"]([a, b], 1)``), where a tensor is a point mass and a
:class:`dualflow.Gaussian` a random activation; point inputs give exactly the torch result.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualflow import rules
from dualflow.gaussian import Gaussian, add_independent
from dualflow.gaussian import cat as gaussian_cat
from dualflow.gaussian import stack as gaussian_stack

__all__ = [
    "ACT_METHODS",
    "KINDS",
    "OPS",
    "Op",
    "UnsupportedOpError",
    "activation",
    "activation_names",
    "elementwise",
    "find",
    "gain",
    "get",
    "is_monotone",
    "lookup",
    "lookup_method",
    "markdown",
]

#: Kinds of op. ``elementwise``: f applied entry by entry; ``layer``: weights (Gaussian or
#: point); ``norm``: normalisation; ``structural``: moves entries (exact); ``reduce``:
#: averages and sums (exact under independence); ``pool``: max pooling; ``binary``: two
#: operands (independence); ``dropout``; ``meta``: shapes, sizes, attributes (no moments).
KINDS = ("elementwise", "layer", "norm", "structural", "reduce", "pool", "binary", "dropout", "meta")

#: Moment rules of element-wise ops: ``None``/``"auto"`` (closed form where the op has one,
#: else Gauss-Hermite), ``"closed"``, ``"gh"`` (Gauss-Hermite), ``"taylor"`` (the paper's Eq. 3).
ACT_METHODS = ("auto", "closed", "gh", "taylor")


class UnsupportedOpError(NotImplementedError):
    """An operation without a moment rule (raised by the converters and by :func:`lookup`)."""


Input = Tensor | Gaussian


# ============================================================================ value helpers


def _split(x: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(x, Gaussian):
        return x.mean, x.var
    return x, None


def _pack(m: Tensor, v: Tensor | None) -> Input:
    return m if v is None else Gaussian(m, v)


def _both(f: Callable[[Tensor], Any], x: Any) -> Any:
    """Apply a structural function to mean and variance (outputs may be tuples of tensors)."""
    if not isinstance(x, Gaussian):
        return f(x)
    m, v = f(x.mean), f(x.var)
    if isinstance(m, Tensor):
        return Gaussian(m, v)
    return type(m)(Gaussian(a, b) for a, b in zip(m, v))


# ============================================================================ the Op record


@dataclasses.dataclass(frozen=True, eq=False)
class Op:
    """One operation of the table (see the module docstring).

    Attributes:
        name: canonical name, the key in :data:`OPS`.
        kind: one of :data:`KINDS`.
        rule: the moment rule in one line and, where it is not exact, its approximation.
        exact: exact under the mean-field assumption (independent entries and operands).
        modules: ``torch.nn`` module classes computing this op (exact type match).
        functions: ``torch`` / ``torch.nn.functional`` / ``operator`` callables.
        methods: tensor method names.
        fn: the point function ``fn(x, **params)`` (element-wise ops); its signature after
            ``x`` names the parameters and their defaults.
        closed: closed-form moments ``closed(m, v, **params) -> (mean, var)`` (element-wise ops).
        deriv: ``f'(x, **params)`` for the Taylor rule (element-wise ops; else autograd).
        impl: the rule on values (non-element-wise ops), with the functional form's signature.
        params: ``params(module) -> dict``: the keyword arguments of the functional form that a
            module instance of ``modules`` stands for.
        to_module: ``to_module(module, **layer_kwargs) -> dualflow module`` for modules of
            ``modules`` (layers with weights, and ops that have their own ``dualflow.nn`` class).
        train_module: ``train_module(*args, **kwargs) -> dualflow module | None``: for a
            functional call whose behaviour follows the model's train/eval mode (dropout).
        check: ``check(*args, **kwargs)`` raises ``UnsupportedOpError`` for arguments without a
            rule (called once per call site by the converter, with graph nodes for tensors).
        elementwise, linear: properties (see the module docstring).
        monotone: non-decreasing (element-wise ops), for the default parameters; a callable
            ``monotone(params) -> bool`` where it depends on them.
        smooth: infinitely differentiable (Gauss-Hermite converges fast; else slowly on kinks).
        gain_value: the initialisation gain where known in closed form; else computed from
            ``fn`` (:meth:`gain`).
        aliases: further names :func:`get` accepts.
    """

    name: str
    kind: str
    rule: str
    exact: bool = True
    modules: tuple[type, ...] = ()
    functions: tuple[Callable[..., Any], ...] = ()
    methods: tuple[str, ...] = ()
    fn: Callable[..., Tensor] | None = None
    closed: Callable[..., tuple[Tensor, Tensor]] | None = None
    deriv: Callable[..., Tensor] | None = None
    impl: Callable[..., Any] | None = None
    params: Callable[[nn.Module], dict[str, Any]] | None = None
    to_module: Callable[..., nn.Module] | None = None
    train_module: Callable[..., nn.Module | None] | None = None
    check: Callable[..., None] | None = None
    elementwise: bool = False
    linear: bool = False
    monotone: bool | Callable[[dict[str, Any]], bool] = False
    smooth: bool = False
    gain_value: float | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"op {self.name!r}: unknown kind {self.kind!r}")
        if self.elementwise and self.fn is None:
            raise ValueError(f"element-wise op {self.name!r} needs its point function fn")
        if not self.elementwise and self.impl is None:
            raise ValueError(f"op {self.name!r} needs impl")

    # ------------------------------------------------------------------ element-wise ops
    @functools.cached_property
    def param_defaults(self) -> dict[str, Any]:
        """Parameters of an element-wise op and their defaults (from the signature of ``fn``)."""
        if self.fn is None:
            return {}
        sig = inspect.signature(self.fn)
        return {k: p.default for k, p in list(sig.parameters.items())[1:]}

    def bind(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """``(x, params)`` of a call of the functional form (``inplace`` is dropped)."""
        kwargs.pop("inplace", None)
        names = list(self.param_defaults)
        if not args:
            x = kwargs.pop("input")
        else:
            x, args = args[0], args[1:]
        if len(args) > len(names):
            args = args[: len(names)]  # a trailing positional ``inplace`` flag
        params = dict(self.param_defaults)
        params.update(zip(names, args))
        unknown = set(kwargs) - set(names)
        if unknown:
            raise UnsupportedOpError(f"{self.name}: no rule for argument(s) {sorted(unknown)}")
        params.update(kwargs)
        return x, params

    def resolve(self, **params: Any) -> dict[str, Any]:
        """The full parameter dict of an element-wise op: defaults updated by ``params``."""
        unknown = set(params) - set(self.param_defaults)
        if unknown:
            raise ValueError(
                f"{self.name}: unknown parameter(s) {sorted(unknown)}; has {list(self.param_defaults)}"
            )
        return {**self.param_defaults, **params}

    def is_monotone(self, params: Mapping[str, Any] | None = None) -> bool:
        """Non-decreasing with these parameters (``False`` for non-element-wise ops)."""
        if not self.elementwise:
            return False
        if callable(self.monotone):
            return bool(self.monotone({**self.param_defaults, **(params or {})}))
        return bool(self.monotone)

    def gain(self, params: Mapping[str, Any] | None = None) -> float:
        """Initialisation gain ``1/sqrt(E f(z)^2)``, ``z ~ N(0, 1)`` (element-wise ops)."""
        if not self.elementwise:
            raise ValueError(f"{self.name}: only element-wise ops have an initialisation gain")
        if self.gain_value is not None and not params:
            return self.gain_value
        key = tuple(sorted({**self.param_defaults, **(params or {})}.items()))
        return _numeric_gain(self, key)

    def moments(
        self, m: Tensor, v: Tensor, method: str | None = None, nodes: int = 20, **params: Any
    ) -> tuple[Tensor, Tensor]:
        """Output moments of an element-wise op for input ``N(m, v)``.

        ``method``: see :data:`ACT_METHODS` (``"closed"`` raises for ops without a closed form).
        """
        method = method or "auto"
        if method not in ACT_METHODS:
            raise ValueError(f"{self.name}: method must be one of {ACT_METHODS}, got {method!r}")
        if method in ("auto", "closed") and self.closed is not None:
            return self.closed(m, v, **params)
        if method == "closed":
            raise ValueError(f"{self.name} has no closed-form moments; use method='gh' or 'taylor'")
        f = functools.partial(self.fn, **params) if params else self.fn
        if method == "taylor":
            if self.deriv is not None:
                d = self.deriv(m, **params)
                return f(m), d * d * v
            return rules.elementwise_taylor(f, m, v)
        return rules.elementwise_gh(f, m, v, nodes)

    def apply_elementwise(
        self, x: Input, params: Mapping[str, Any], method: str | None = None, nodes: int = 20
    ) -> Input:
        """The op on a point tensor (``fn``, exact) or a Gaussian (:meth:`moments`)."""
        if isinstance(x, Gaussian):
            return Gaussian(*self.moments(x.mean, x.var, method, nodes, **params))
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.name}: expected a Tensor or Gaussian, got {type(x).__name__}")
        return self.fn(x, **params)

    # ------------------------------------------------------------------ every op
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The op on values, with the signature of its functional form."""
        if self.elementwise:
            x, params = self.bind(*args, **kwargs)
            return self.apply_elementwise(x, params)
        return self.impl(*args, **kwargs)

    def module_params(self, module: nn.Module) -> dict[str, Any]:
        """Keyword arguments of the functional form that ``module`` stands for."""
        return {} if self.params is None else self.params(module)

    def __repr__(self) -> str:
        return f"Op({self.name!r}, kind={self.kind!r})"


@functools.lru_cache(maxsize=128)
def _numeric_gain(op: Op, params: tuple[tuple[str, Any], ...]) -> float:
    # E f(z)^2 by the trapezoid rule on a fine grid: spectrally accurate for smooth f against
    # the Gaussian weight, O(h^2) ~ 1e-8 on kinks.
    z = torch.linspace(-20.0, 20.0, 400_001, dtype=torch.float64)
    w = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    fz = op.fn(z, **dict(params))
    second = float(torch.trapezoid(fz * fz * w, z))
    return 1.0 / math.sqrt(second)


# ============================================================================ dualflow.nn factories
# The table is imported by dualflow.nn (the activations read it), so it imports the module
# classes it builds only when it builds one.


def _dnn() -> Any:
    import dualflow.nn as dnn

    return dnn


def _activation_module(op: Op) -> Callable[..., nn.Module]:
    def make(module: nn.Module, **_: Any) -> nn.Module:
        return _dnn().Activation(op.name, **op.module_params(module))

    return make


# ============================================================================ element-wise entries


def _unary(
    name: str,
    fn: Callable[..., Tensor],
    rule: str,
    *,
    modules: tuple[type, ...] = (),
    functions: tuple[Callable[..., Any], ...] = (),
    methods: tuple[str, ...] = (),
    closed: Callable[..., tuple[Tensor, Tensor]] | None = None,
    deriv: Callable[..., Tensor] | None = None,
    monotone: bool | Callable[[dict[str, Any]], bool] = False,
    smooth: bool = False,
    linear: bool = False,
    gain: float | None = None,
    params: Callable[[nn.Module], dict[str, Any]] | None = None,
    aliases: tuple[str, ...] = (),
) -> Op:
    """An element-wise entry. Its rule: ``closed`` if given, else Gauss-Hermite quadrature of ``fn``
    (exact as the number of nodes grows; the default 20 nodes is accurate to ~1e-6 relative for
    smooth ``f`` and ~1e-3 on kinks)."""
    op = Op(
        name=name,
        kind="elementwise",
        rule=rule,
        exact=closed is not None,
        modules=modules,
        functions=functions,
        methods=methods,
        fn=fn,
        closed=closed,
        deriv=deriv,
        params=params,
        elementwise=True,
        linear=linear,
        monotone=monotone,
        smooth=smooth,
        gain_value=gain,
        aliases=aliases,
    )
    return dataclasses.replace(op, to_module=_activation_module(op) if modules else None)


def _relu(x: Tensor) -> Tensor:
    return torch.relu(x)


def _relu6(x: Tensor) -> Tensor:
    return F.relu6(x)


def _hardtanh(x: Tensor, min_val: float = -1.0, max_val: float = 1.0) -> Tensor:
    return F.hardtanh(x, min_val, max_val)


def _hardsigmoid(x: Tensor) -> Tensor:
    return F.hardsigmoid(x)


def _clamp(x: Tensor, min: float | None = None, max: float | None = None) -> Tensor:
    return torch.clamp(x, min, max)


def _clamp_min(x: Tensor, min: float) -> Tensor:
    return torch.clamp(x, min=min)


def _clamp_max(x: Tensor, max: float) -> Tensor:
    return torch.clamp(x, max=max)


def _leaky_relu(x: Tensor, negative_slope: float = 0.01) -> Tensor:
    return F.leaky_relu(x, negative_slope)


def _gelu(x: Tensor, approximate: str = "none") -> Tensor:
    return F.gelu(x, approximate=approximate)


def _silu(x: Tensor) -> Tensor:
    return F.silu(x)


def _mish(x: Tensor) -> Tensor:
    return F.mish(x)


def _hardswish(x: Tensor) -> Tensor:
    return F.hardswish(x)


def _tanh(x: Tensor) -> Tensor:
    return torch.tanh(x)


def _sigmoid(x: Tensor) -> Tensor:
    return torch.sigmoid(x)


def _elu(x: Tensor, alpha: float = 1.0) -> Tensor:
    return F.elu(x, alpha)


def _celu(x: Tensor, alpha: float = 1.0) -> Tensor:
    return F.celu(x, alpha)


def _selu(x: Tensor) -> Tensor:
    return F.selu(x)


def _softplus(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return F.softplus(x, beta, threshold)


def _exp(x: Tensor) -> Tensor:
    return torch.exp(x)


def _square(x: Tensor) -> Tensor:
    return x * x


def _identity(x: Tensor) -> Tensor:
    return x


def _relu_closed(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return rules.relu(m, v)


def _hardsigmoid_closed(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    # hardsigmoid(x) = clamp(x / 6 + 1/2, 0, 1): an affine map, then a clip
    return rules.clip(m / 6.0 + 0.5, v / 36.0, 0.0, 1.0)


_ELEMENTWISE: list[Op] = [
    _unary(
        "relu",
        _relu,
        "closed form of the rectified Gaussian (docs/maths.md section 1.2)",
        modules=(nn.ReLU,),
        functions=(F.relu, torch.relu, torch.relu_, F.relu_),
        methods=("relu", "relu_"),
        closed=_relu_closed,
        deriv=lambda x: (x > 0).to(x.dtype),
        monotone=True,
        gain=math.sqrt(2.0),
    ),
    _unary(
        "relu6",
        _relu6,
        "closed form of the Gaussian clipped to [0, 6] (rules.clip)",
        modules=(nn.ReLU6,),
        functions=(F.relu6,),
        closed=lambda m, v: rules.clip(m, v, 0.0, 6.0),
        monotone=True,
    ),
    _unary(
        "hardtanh",
        _hardtanh,
        "closed form of the Gaussian clipped to [min_val, max_val] (rules.clip)",
        modules=(nn.Hardtanh,),
        functions=(F.hardtanh, F.hardtanh_),
        closed=lambda m, v, min_val=-1.0, max_val=1.0: rules.clip(m, v, min_val, max_val),
        monotone=True,
        params=lambda mod: {"min_val": mod.min_val, "max_val": mod.max_val},
    ),
    _unary(
        "hardsigmoid",
        _hardsigmoid,
        "closed form: clamp(x/6 + 1/2, 0, 1) (rules.clip)",
        modules=(nn.Hardsigmoid,),
        functions=(F.hardsigmoid,),
        closed=_hardsigmoid_closed,
        monotone=True,
    ),
    _unary(
        "clamp",
        _clamp,
        "closed form of the clipped Gaussian (rules.clip)",
        functions=(torch.clamp, torch.clip),
        methods=("clamp", "clip", "clamp_", "clip_"),
        closed=lambda m, v, min=None, max=None: rules.clip(m, v, min, max),
        monotone=True,
    ),
    _unary(
        "clamp_min",
        _clamp_min,
        "closed form of the clipped Gaussian (rules.clip)",
        functions=(torch.clamp_min,),
        methods=("clamp_min", "clamp_min_"),
        closed=lambda m, v, min: rules.clip(m, v, min, None),
        monotone=True,
    ),
    _unary(
        "clamp_max",
        _clamp_max,
        "closed form of the clipped Gaussian (rules.clip)",
        functions=(torch.clamp_max,),
        methods=("clamp_max", "clamp_max_"),
        closed=lambda m, v, max: rules.clip(m, v, None, max),
        monotone=True,
    ),
    _unary(
        "leaky_relu",
        _leaky_relu,
        "closed form: a x + (1 - a) relu(x) with Cov(x, relu x) = v Phi(m/s) (rules.leaky_relu)",
        modules=(nn.LeakyReLU,),
        functions=(F.leaky_relu, F.leaky_relu_),
        closed=lambda m, v, negative_slope=0.01: rules.leaky_relu(m, v, negative_slope),
        monotone=lambda p: p["negative_slope"] >= 0,
        params=lambda mod: {"negative_slope": mod.negative_slope},
    ),
    _unary(
        "gelu",
        _gelu,
        "Gauss-Hermite quadrature (smooth: converges fast)",
        modules=(nn.GELU,),
        functions=(F.gelu,),
        smooth=True,
        params=lambda mod: {"approximate": mod.approximate},
    ),
    _unary(
        "silu",
        _silu,
        "Gauss-Hermite quadrature (smooth: converges fast)",
        modules=(nn.SiLU,),
        functions=(F.silu,),
        smooth=True,
        aliases=("swish",),
    ),
    _unary(
        "mish",
        _mish,
        "Gauss-Hermite quadrature (smooth: converges fast)",
        modules=(nn.Mish,),
        functions=(F.mish,),
        smooth=True,
    ),
    _unary(
        "hardswish",
        _hardswish,
        "closed form of the piecewise polynomial 0 | x (x + 3) / 6 | x (rules.piecewise_poly)",
        modules=(nn.Hardswish,),
        functions=(F.hardswish,),
        closed=lambda m, v: rules.piecewise_poly(
            m, v, (-3.0, 3.0), ((0.0,), (0.0, 0.5, 1.0 / 6.0), (0.0, 1.0))
        ),
    ),
    _unary(
        "tanh",
        _tanh,
        "Gauss-Hermite quadrature (smooth: converges fast)",
        modules=(nn.Tanh,),
        functions=(torch.tanh, F.tanh),
        methods=("tanh",),
        monotone=True,
        smooth=True,
    ),
    _unary(
        "sigmoid",
        _sigmoid,
        "Gauss-Hermite quadrature (smooth: converges fast)",
        modules=(nn.Sigmoid,),
        functions=(torch.sigmoid, F.sigmoid),
        methods=("sigmoid",),
        monotone=True,
        smooth=True,
    ),
    _unary(
        "elu",
        _elu,
        "Gauss-Hermite quadrature (kink: 20 nodes err up to 0.8% of the sd in the mean, 2% in the variance)",
        modules=(nn.ELU,),
        functions=(F.elu,),
        monotone=lambda p: p["alpha"] >= 0,
        params=lambda mod: {"alpha": mod.alpha},
    ),
    _unary(
        "celu",
        _celu,
        "Gauss-Hermite quadrature (kink: 20 nodes err up to 0.8% of the sd in the mean, 2% in the variance)",
        modules=(nn.CELU,),
        functions=(F.celu,),
        monotone=True,
        params=lambda mod: {"alpha": mod.alpha},
    ),
    _unary(
        "selu",
        _selu,
        "Gauss-Hermite quadrature (kink: 20 nodes err up to 1.6% of the sd in the mean, 4% in the variance)",
        modules=(nn.SELU,),
        functions=(F.selu,),
        monotone=True,
    ),
    _unary(
        "softplus",
        _softplus,
        "Gauss-Hermite quadrature (smooth: converges fast)",
        modules=(nn.Softplus,),
        functions=(F.softplus,),
        monotone=True,
        smooth=True,
        params=lambda mod: {"beta": mod.beta, "threshold": mod.threshold},
    ),
    _unary(
        "exp",
        _exp,
        "closed form (log-normal)",
        functions=(torch.exp,),
        methods=("exp",),
        closed=rules.exp,
        monotone=True,
    ),
    _unary(
        "square",
        _square,
        "closed form: (m^2 + v, 2 v^2 + 4 m^2 v)",
        functions=(torch.square,),
        methods=("square",),
        closed=rules.square,
    ),
    _unary(
        "identity",
        _identity,
        "exact (the identity)",
        modules=(nn.Identity,),
        functions=(torch.clone,),
        methods=("contiguous", "clone"),
        closed=lambda m, v: (m, v),
        monotone=True,
        linear=True,
        smooth=True,
        gain=1.0,
        aliases=("linear",),
    ),
]


# ============================================================================ binary ops


def _is_random(x: Any) -> bool:
    return isinstance(x, Gaussian)


def _scale(x: Input, a: Any) -> Input:
    """``a x`` for a constant ``a`` (number or tensor): ``(a m, a^2 v)``. Exact."""
    m, v = _split(x)
    return _pack(m * a, None if v is None else v * (a * a))


def _add(a: Any, b: Any, *, alpha: Any = 1) -> Any:
    if a is b and _is_random(a):  # the same random variable twice: exactly (1 + alpha) x
        return _scale(a, 1.0 + alpha)
    if alpha != 1:
        b = _scale(b, alpha) if isinstance(b, (Tensor, Gaussian)) else b * alpha
    if not (_is_random(a) or _is_random(b)):
        return a + b
    if not _is_random(a):
        a, b = b, a
    if not _is_random(b):  # a constant (or point activation) shifts the mean
        mean = a.mean + b
        var = a.var if a.var.shape == mean.shape else a.var.broadcast_to(mean.shape).contiguous()
        return Gaussian(mean, var)
    return add_independent(a, b)


def _sub(a: Any, b: Any, *, alpha: Any = 1) -> Any:
    if a is b and _is_random(a):
        return torch.zeros_like(a.mean)
    return _add(a, _scale(b, -alpha) if isinstance(b, (Tensor, Gaussian)) else -alpha * b)


def _rsub(a: Any, b: Any, *, alpha: Any = 1) -> Any:  # torch.rsub(a, b) = b - alpha a
    return _sub(b, a, alpha=alpha)


def _mul(a: Any, b: Any) -> Any:
    if not (_is_random(a) or _is_random(b)):
        return a * b
    if a is b:
        return Gaussian(*rules.square(a.mean, a.var))
    if not _is_random(b):
        return _scale(a, b)
    if not _is_random(a):
        return _scale(b, a)
    return Gaussian(*rules.product(a.mean, a.var, b.mean, b.var))


def _div(a: Any, b: Any, *, rounding_mode: str | None = None) -> Any:
    if rounding_mode is not None and (_is_random(a) or _is_random(b)):
        raise UnsupportedOpError("division with rounding_mode has no moment rule")
    if _is_random(b):
        raise UnsupportedOpError("division by a random activation has no moment rule")
    if not _is_random(a):
        return torch.div(a, b, rounding_mode=rounding_mode)
    return _scale(a, 1.0 / b)


def _neg(x: Any) -> Any:
    return _scale(x, -1.0) if _is_random(x) else -x


def _pow(x: Any, e: Any) -> Any:
    if not _is_random(x):
        return x**e
    if e == 1:
        return x
    if e == 2:
        return Gaussian(*rules.square(x.mean, x.var))
    raise UnsupportedOpError(f"x ** {e} has no moment rule (only x ** 1 and x ** 2)")


def _matmul(a: Any, b: Any) -> Any:
    if _is_random(b):
        raise UnsupportedOpError("a product with a random right operand (a @ X) has no moment rule")
    if not _is_random(a):
        return a @ b
    m, v = a
    return Gaussian(m @ b, v @ (b * b))


def _check_pow(x: Any, e: Any, *_: Any, **__: Any) -> None:
    if not isinstance(e, (int, float)) or e not in (1, 2):
        raise UnsupportedOpError(f"x ** {e!r} has no moment rule (only x ** 1 and x ** 2)")


def _no_node(what: str) -> Callable[..., None]:
    """A check that the operand at position 1 is a constant (not a graph value)."""

    def check(a: Any, b: Any = None, *_: Any, **__: Any) -> None:
        if isinstance(b, torch.fx.Node) and _node_is_tensor(b):
            raise UnsupportedOpError(what)

    return check


def _node_is_tensor(n: Any) -> bool:
    # get_attr nodes are parameters/buffers (constants); everything else may be random
    return isinstance(n, torch.fx.Node) and n.op != "get_attr"


# ============================================================================ structural ops


def _method(name: str) -> Callable[..., Any]:
    """The tensor method ``name`` applied to mean and variance alike (an exact move of entries)."""

    def impl(x: Any, *args: Any, **kwargs: Any) -> Any:
        return _both(lambda t: getattr(t, name)(*args, **kwargs), x)

    impl.__name__ = name
    return impl


def _getitem(x: Any, key: Any) -> Any:
    if isinstance(x, Gaussian):
        return Gaussian(x.mean[key], x.var[key])
    return x[key]


_META_ATTRS = ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad")


def _getattr(x: Any, name: str) -> Any:
    if isinstance(x, Gaussian):
        if name in ("T", "mT"):
            return Gaussian(getattr(x.mean, name), getattr(x.var, name))
        return getattr(x.mean, name)
    return getattr(x, name)


def _check_getattr(x: Any, name: Any = None, *_: Any) -> None:
    if name not in (*_META_ATTRS, "T", "mT"):
        raise UnsupportedOpError(f"attribute .{name} of an activation has no rule")


def _size(x: Any, *args: Any) -> Any:
    return (x.mean if isinstance(x, Gaussian) else x).size(*args)


def _dim(x: Any) -> int:
    return (x.mean if isinstance(x, Gaussian) else x).dim()


def _numel(x: Any) -> int:
    return (x.mean if isinstance(x, Gaussian) else x).numel()


def _cat(tensors: Sequence[Any], dim: int = 0, **kw: Any) -> Any:
    dim = kw.pop("axis", dim)
    if all(not _is_random(t) for t in tensors):
        return torch.cat(list(tensors), dim)
    return gaussian_cat(list(tensors), dim)


def _stack(tensors: Sequence[Any], dim: int = 0) -> Any:
    if all(not _is_random(t) for t in tensors):
        return torch.stack(list(tensors), dim)
    return gaussian_stack(list(tensors), dim)


def _pad(x: Any, pad: Sequence[int], mode: str = "constant", value: float | None = None) -> Any:
    m, v = _split(x)
    mean = F.pad(m, pad, mode=mode, value=value)
    if v is None:
        return mean
    # padded entries are constants (variance 0) or copies of entries (their variance)
    return Gaussian(mean, F.pad(v, pad, mode=mode, value=0.0 if mode == "constant" else None))


def _expand(x: Any, *sizes: Any) -> Any:
    return _both(lambda t: t.expand(*sizes), x)


# ============================================================================ reductions and pools


def _dims(x: Tensor, dim: Any) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(x.dim()))
    return (dim,) if isinstance(dim, int) else tuple(dim)


def _mean(x: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Any:
    """Mean over ``k`` entries: ``(mean(m), sum(v) / k^2)``. Exact for independent entries."""
    m, v = _split(x)
    if dtype is not None:
        m, v = m.to(dtype), (None if v is None else v.to(dtype))
    dims = _dims(m, dim)
    mean = m.mean(dim=dims, keepdim=keepdim)
    if v is None:
        return mean
    k = math.prod(m.shape[d] for d in dims)
    return Gaussian(mean, v.sum(dim=dims, keepdim=keepdim) / (k * k))


def _sum(x: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Any:
    """Sum: ``(sum(m), sum(v))``. Exact for independent entries."""
    m, v = _split(x)
    if dtype is not None:
        m, v = m.to(dtype), (None if v is None else v.to(dtype))
    dims = _dims(m, dim)
    return _pack(m.sum(dim=dims, keepdim=keepdim), None if v is None else v.sum(dim=dims, keepdim=keepdim))


def _window_sizes(n_in: int, n_out: int, like: Tensor) -> Tensor:
    # adaptive pooling: window i covers [floor(i n_in / n_out), ceil((i + 1) n_in / n_out))
    i = torch.arange(n_out)
    start = torch.div(i * n_in, n_out, rounding_mode="floor")
    end = torch.div((i + 1) * n_in + n_out - 1, n_out, rounding_mode="floor")
    return (end - start).to(dtype=like.dtype, device=like.device)


def _adaptive_avg_pool2d(x: Any, output_size: Any) -> Any:
    """Adaptive average pooling: mean as torch; variance ``avgpool(v) / k`` per window. Exact."""
    m, v = _split(x)
    mean = F.adaptive_avg_pool2d(m, output_size)
    if v is None:
        return mean
    oh, ow = mean.shape[-2:]
    kh = _window_sizes(m.shape[-2], oh, m)
    kw = _window_sizes(m.shape[-1], ow, m)
    return Gaussian(mean, F.adaptive_avg_pool2d(v, output_size) / (kh[:, None] * kw[None, :]))


def _avg_pool2d(
    x: Any,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> Any:
    """Average pooling: mean as torch; variance ``sum_window(v) / d^2`` with ``d`` the divisor. Exact."""
    m, v = _split(x)
    kw = dict(kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode)
    mean = F.avg_pool2d(m, count_include_pad=count_include_pad, divisor_override=divisor_override, **kw)
    if v is None:
        return mean
    total = F.avg_pool2d(v, divisor_override=1, **kw)
    if divisor_override is not None:
        d: Any = float(divisor_override)
    elif count_include_pad:
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        d = float(k[0] * k[1])
    else:
        ones = torch.ones_like(m[:1, :1])
        d = F.avg_pool2d(ones, divisor_override=1, **kw)
    return Gaussian(mean, total / (d * d))


def _check_avg_pool2d(*args: Any, **kw: Any) -> None:
    if (len(args) > 4 and args[4]) or kw.get("ceil_mode"):
        raise UnsupportedOpError("avg_pool2d with ceil_mode=True has no rule")


def _max_pool2d(
    x: Any,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Any:
    _check_max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    if not _is_random(x):
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    return _dnn().MaxPool2d(kernel_size, stride if stride else None, padding)(x)


def _check_max_pool2d(
    x: Any,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> None:
    if dilation not in (1, (1, 1), [1, 1]) or ceil_mode or return_indices:
        raise UnsupportedOpError("max_pool2d with dilation, ceil_mode or return_indices has no rule")


# ============================================================================ layers and norms


def _linear_fn(x: Any, weight: Tensor, bias: Tensor | None = None) -> Any:
    """``F.linear`` with point (constant) weights: ``A_W(m) + b``, ``A_{W^2}(v)``. Exact."""
    m, v = _split(x)
    if v is None:
        return F.linear(m, weight, bias)
    return Gaussian(*rules.linear(m, v, weight, None, bias, None))


def _conv_fn(nd: int) -> Callable[..., Any]:
    conv = {1: F.conv1d, 2: F.conv2d}[nd]

    def impl(
        x: Any,
        weight: Tensor,
        bias: Tensor | None = None,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
    ) -> Any:
        m, v = _split(x)
        if v is None:
            return conv(m, weight, bias, stride, padding, dilation, groups)
        kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        return Gaussian(*rules.conv(m, v, weight, None, bias, None, **kw))

    return impl


def _weights_constant(x: Any, weight: Any = None, bias: Any = None, *_: Any, **kw: Any) -> None:
    for w in (weight, bias, kw.get("weight"), kw.get("bias")):
        if _node_is_tensor(w):
            raise UnsupportedOpError("a linear map whose weights are activations has no moment rule")


def _check_layer_norm(
    x: Any, shape: Any = None, weight: Any = None, bias: Any = None, *_: Any, **kw: Any
) -> None:
    _weights_constant(x, weight, bias, **kw)


def _layer_norm_fn(
    x: Any,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Any:
    m, v = _split(x)
    if v is None:
        return F.layer_norm(m, normalized_shape, weight, bias, eps)
    return _pack(*rules.layer_norm_linearized(m, v, tuple(normalized_shape), weight, bias, eps))


def _copy_affine(dst: Any, src: nn.Module) -> Any:
    with torch.no_grad():
        dst.weight_mu.copy_(src.weight)
        if getattr(src, "bias", None) is not None:
            dst.bias_mu.copy_(src.bias)
    return dst


def _linear_module(m: nn.Linear, **kw: Any) -> nn.Module:
    out = _dnn().Linear(
        m.in_features,
        m.out_features,
        bias=m.bias is not None,
        dtype=m.weight.dtype,
        device=m.weight.device,
        **kw,
    )
    return _copy_affine(out, m)


def _conv_module(m: nn.Module, **kw: Any) -> nn.Module:
    dnn = _dnn()
    cls = dnn.Conv1d if isinstance(m, nn.Conv1d) else dnn.Conv2d
    if m.padding_mode != "zeros":
        raise UnsupportedOpError(f"{type(m).__name__} with padding_mode={m.padding_mode!r} has no rule")
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


def _bn_module(m: nn.Module, **_: Any) -> nn.Module:
    dnn = _dnn()
    if not m.track_running_stats:
        raise UnsupportedOpError(f"{type(m).__name__} without running statistics has no eval-mode rule")
    cls = dnn.BatchNorm1d if isinstance(m, nn.BatchNorm1d) else dnn.BatchNorm2d
    w = m.weight if m.affine else m.running_mean
    out = cls(
        m.num_features,
        m.eps,
        m.momentum if m.momentum is not None else 0.1,
        m.affine,
        device=w.device,
        dtype=w.dtype,
    )
    out.load_state_dict(m.state_dict())
    out.train(m.training)
    return out


def _ln_module(m: nn.LayerNorm, **_: Any) -> nn.Module:
    if m.elementwise_affine and m.bias is None:
        raise UnsupportedOpError("LayerNorm(bias=False) has no dualflow counterpart")
    p = m.weight if m.weight is not None else None
    out = _dnn().LayerNorm(
        m.normalized_shape,
        m.eps,
        m.elementwise_affine,
        device=None if p is None else p.device,
        dtype=None if p is None else p.dtype,
        method="linearized",
    )
    out.load_state_dict(m.state_dict())
    return out


def _maxpool_module(m: nn.MaxPool2d, **_: Any) -> nn.Module:
    _check_max_pool2d(None, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)
    return _dnn().MaxPool2d(m.kernel_size, m.stride, m.padding)


def _avgpool_module(m: nn.AvgPool2d, **_: Any) -> nn.Module:
    p = _avgpool_params(m)
    if p["ceil_mode"]:
        raise UnsupportedOpError("AvgPool2d with ceil_mode=True has no rule")
    if p["count_include_pad"] and p["divisor_override"] is None:
        return _dnn().AvgPool2d(m.kernel_size, m.stride, m.padding)
    return _dnn().Functional("avg_pool2d", **p)


def _avgpool_params(m: nn.AvgPool2d) -> dict[str, Any]:
    return {
        "kernel_size": m.kernel_size,
        "stride": m.stride,
        "padding": m.padding,
        "ceil_mode": m.ceil_mode,
        "count_include_pad": m.count_include_pad,
        "divisor_override": m.divisor_override,
    }


def _dropout(x: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
    """Inverted dropout: mean ``m``, variance ``(v + p m^2) / (1 - p)`` (exact for an independent
    mask); the identity when not training."""
    if not training or p == 0.0:
        return x
    if not _is_random(x):
        return F.dropout(x, p, True)
    m, v = x
    return Gaussian(m, (v + p * m * m) / (1.0 - p))


def _dropout_train_module(x: Any = None, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
    # a functional dropout with training=True follows the converted model's train/eval mode
    return _dnn().Dropout(p) if training and p > 0 else None


def _passthrough(*_: Any, **__: Any) -> None:
    return None


def _structural(
    name: str,
    rule: str,
    methods: tuple[str, ...] = (),
    functions: tuple[Callable[..., Any], ...] = (),
    **kw: Any,
) -> Op:
    return Op(
        name,
        "structural",
        rule,
        impl=_method(name),
        methods=methods or (name,),
        functions=functions,
        linear=True,
        **kw,
    )


_OTHER: list[Op] = [
    # ---------------------------------------------------------------- layers with weights
    Op(
        "linear",
        "layer",
        "nn.Linear: Gaussian or point weights, A_mu(m) + mu_b and A_{mu^2}(v) + A_{s^2}(m^2 + v) + s_b^2; "
        "F.linear with constant weights: the point-weight rule",
        modules=(nn.Linear,),
        functions=(F.linear,),
        impl=_linear_fn,
        to_module=_linear_module,
        check=_weights_constant,
        linear=True,
    ),
    Op(
        "conv1d",
        "layer",
        "as linear, with the convolution as the linear map",
        modules=(nn.Conv1d,),
        functions=(F.conv1d,),
        impl=_conv_fn(1),
        to_module=_conv_module,
        check=_weights_constant,
        linear=True,
    ),
    Op(
        "conv2d",
        "layer",
        "as linear, with the convolution as the linear map",
        modules=(nn.Conv2d,),
        functions=(F.conv2d,),
        impl=_conv_fn(2),
        to_module=_conv_module,
        check=_weights_constant,
        linear=True,
    ),
    Op(
        "matmul",
        "layer",
        "x @ W with a constant W: (m W, v W^2)",
        functions=(operator.matmul, torch.matmul),
        methods=("matmul",),
        impl=_matmul,
        check=_no_node("a product of two activations (x @ y) has no moment rule"),
        linear=True,
    ),
    # ---------------------------------------------------------------- normalisation
    Op(
        "batch_norm",
        "norm",
        "eval mode: the exact affine map with running statistics; training mode normalises with "
        "batch statistics of the means (treated as constants of the variance path)",
        exact=False,
        modules=(nn.BatchNorm1d, nn.BatchNorm2d),
        impl=_passthrough,
        to_module=_bn_module,
        linear=True,
    ),
    Op(
        "layer_norm",
        "norm",
        "mean with the statistics of the means; variance to first order in the input noise, "
        "statistics included (rules.layer_norm_linearized; the plain rule's v g^2 / var(m) overestimates it)",
        exact=False,
        modules=(nn.LayerNorm,),
        functions=(F.layer_norm,),
        impl=_layer_norm_fn,
        to_module=_ln_module,
        check=_check_layer_norm,
    ),
    # ---------------------------------------------------------------- dropout
    Op(
        "dropout",
        "dropout",
        "identity in eval mode; in training mode (m, (v + p m^2) / (1 - p)) (exact for an independent mask)",
        modules=(nn.Dropout,),
        functions=(F.dropout,),
        impl=_dropout,
        params=lambda mod: {"p": mod.p},
        to_module=lambda mod, **_: _dnn().Dropout(mod.p),
        train_module=_dropout_train_module,
    ),
    # ---------------------------------------------------------------- binary
    Op(
        "add",
        "binary",
        "independent operands: (m1 + m2, v1 + v2) (a residual x + f(x) ignores their correlation); "
        "a constant shifts the mean; the same value twice is exactly 2x",
        exact=True,
        functions=(operator.add, operator.iadd, torch.add),
        methods=("add", "add_", "__add__", "__radd__", "__iadd__"),
        impl=_add,
        linear=True,
    ),
    Op(
        "sub",
        "binary",
        "independent operands: (m1 - m2, v1 + v2); x - x is exactly 0",
        functions=(operator.sub, operator.isub, torch.sub),
        methods=("sub", "sub_", "__sub__", "__isub__"),
        impl=_sub,
        linear=True,
    ),
    Op(
        "rsub",
        "binary",
        "as sub with the operands swapped",
        functions=(torch.rsub,),
        methods=("__rsub__",),
        impl=_rsub,
        linear=True,
    ),
    Op(
        "mul",
        "binary",
        "a constant c: (c m, c^2 v); independent activations: (mx my, mx^2 vy + my^2 vx + vx vy) "
        "(a gate computed from x ignores the correlation); x * x: the exact square",
        functions=(operator.mul, operator.imul, torch.mul),
        methods=("mul", "mul_", "__mul__", "__rmul__", "__imul__"),
        impl=_mul,
    ),
    Op(
        "div",
        "binary",
        "division by a constant c: (m / c, v / c^2); no rule for a random divisor",
        functions=(operator.truediv, operator.itruediv, torch.div, torch.true_divide),
        methods=("div", "div_", "__truediv__", "__itruediv__", "true_divide"),
        impl=_div,
        check=_no_node("division by an activation has no moment rule"),
        linear=True,
    ),
    Op(
        "neg",
        "binary",
        "(-m, v)",
        functions=(operator.neg, torch.neg),
        methods=("neg", "__neg__"),
        impl=_neg,
        linear=True,
    ),
    Op(
        "pow",
        "binary",
        "x ** 2: the exact square (m^2 + v, 2 v^2 + 4 m^2 v); x ** 1: x",
        functions=(operator.pow, torch.pow),
        methods=("pow", "__pow__"),
        impl=_pow,
        check=_check_pow,
    ),
    # ---------------------------------------------------------------- structural (exact)
    Op(
        "cat",
        "structural",
        "concatenate means and variances",
        functions=(torch.cat, torch.concat, torch.concatenate),
        impl=_cat,
        linear=True,
    ),
    Op(
        "stack", "structural", "stack means and variances", functions=(torch.stack,), impl=_stack, linear=True
    ),
    _structural("flatten", "flatten both", functions=(torch.flatten,)),
    _structural("view", "view both"),
    _structural("reshape", "reshape both", functions=(torch.reshape,)),
    _structural("permute", "permute both", functions=(torch.permute,)),
    _structural(
        "transpose",
        "transpose both",
        methods=("transpose", "swapaxes"),
        functions=(torch.transpose, torch.swapaxes),
    ),
    _structural("squeeze", "squeeze both", functions=(torch.squeeze,)),
    _structural("unsqueeze", "unsqueeze both", functions=(torch.unsqueeze,)),
    _structural("chunk", "chunk both", functions=(torch.chunk,)),
    _structural("split", "split both", functions=(torch.split,)),
    _structural("unbind", "unbind both", functions=(torch.unbind,)),
    _structural("roll", "roll both", functions=(torch.roll,)),
    _structural("flip", "flip both", functions=(torch.flip,)),
    _structural("to", "cast both (dtype/device)"),
    Op(
        "expand",
        "structural",
        "expand both; the copies are exact marginals, treated as independent downstream",
        exact=False,
        methods=("expand",),
        impl=_expand,
        linear=True,
    ),
    Op(
        "pad",
        "structural",
        "pad the mean as torch; the variance with 0 (constant mode) or copies (other modes)",
        functions=(F.pad,),
        impl=_pad,
        linear=True,
    ),
    Op(
        "getitem",
        "structural",
        "index both (tensors); plain indexing of tuples, lists and sizes",
        functions=(operator.getitem,),
        impl=_getitem,
        linear=True,
    ),
    Op(
        "flatten_module",
        "structural",
        "nn.Flatten: flatten both",
        modules=(nn.Flatten,),
        impl=lambda x, start_dim=1, end_dim=-1: _both(lambda t: t.flatten(start_dim, end_dim), x),
        params=lambda mod: {"start_dim": mod.start_dim, "end_dim": mod.end_dim},
        to_module=lambda mod, **_: _dnn().Flatten(mod.start_dim, mod.end_dim),
        linear=True,
    ),
    # ---------------------------------------------------------------- meta (no moments)
    Op(
        "getattr",
        "meta",
        "shape/dtype/device of the mean; .T transposes both",
        functions=(getattr,),
        impl=_getattr,
        check=_check_getattr,
    ),
    Op("size", "meta", "the size of the mean", methods=("size",), impl=_size),
    Op("dim", "meta", "the dimension of the mean", methods=("dim",), impl=_dim),
    Op("numel", "meta", "the number of entries", methods=("numel",), impl=_numel),
    # ---------------------------------------------------------------- reductions and pools
    Op(
        "mean",
        "reduce",
        "(mean(m), sum(v) / k^2), exact for independent entries",
        functions=(torch.mean,),
        methods=("mean",),
        impl=_mean,
        linear=True,
    ),
    Op(
        "sum",
        "reduce",
        "(sum(m), sum(v)), exact for independent entries",
        functions=(torch.sum,),
        methods=("sum",),
        impl=_sum,
        linear=True,
    ),
    Op(
        "adaptive_avg_pool2d",
        "reduce",
        "(avgpool(m), avgpool(v) / k) per window of k entries",
        modules=(nn.AdaptiveAvgPool2d,),
        functions=(F.adaptive_avg_pool2d,),
        impl=_adaptive_avg_pool2d,
        params=lambda mod: {"output_size": mod.output_size},
        to_module=lambda mod, **_: _dnn().Functional("adaptive_avg_pool2d", output_size=mod.output_size),
        linear=True,
    ),
    Op(
        "avg_pool2d",
        "reduce",
        "(avgpool(m), sum_window(v) / d^2) with d the divisor",
        modules=(nn.AvgPool2d,),
        functions=(F.avg_pool2d,),
        impl=_avg_pool2d,
        params=_avgpool_params,
        to_module=_avgpool_module,
        check=_check_avg_pool2d,
        linear=True,
    ),
    Op(
        "max_pool2d",
        "pool",
        "dualflow.nn.MaxPool2d (Clark's pairwise maxima by default, approximate beyond 2 inputs); "
        "the converters pool the pre-activations of a monotone activation instead (same function)",
        exact=False,
        modules=(nn.MaxPool2d,),
        functions=(F.max_pool2d,),
        impl=_max_pool2d,
        params=lambda mod: {
            "kernel_size": mod.kernel_size,
            "stride": mod.stride,
            "padding": mod.padding,
            "dilation": mod.dilation,
            "ceil_mode": mod.ceil_mode,
            "return_indices": mod.return_indices,
        },
        to_module=_maxpool_module,
        check=_check_max_pool2d,
    ),
]


# ============================================================================ the table

#: name -> :class:`Op`: the one table of operations (see the module docstring).
OPS: dict[str, Op] = {}
for _op in (*_ELEMENTWISE, *_OTHER):
    if _op.name in OPS:
        raise RuntimeError(f"duplicate op {_op.name!r}")
    OPS[_op.name] = _op

#: element-wise ops by name and alias (the names activations are known by: "linear" is the identity)
_ACT_NAMES: dict[str, Op] = {a: op for op in OPS.values() if op.elementwise for a in (op.name, *op.aliases)}
_NAMES: dict[str, Op] = {**{a: op for op in OPS.values() for a in op.aliases}, **OPS}
_BY_MODULE: dict[type, Op] = {}
_BY_FUNCTION: dict[int, tuple[Callable[..., Any], Op]] = {}
_BY_METHOD: dict[str, Op] = {}
for _op in OPS.values():
    for _cls in _op.modules:
        if _cls in _BY_MODULE:
            raise RuntimeError(f"{_cls.__name__} is listed by two ops")
        _BY_MODULE[_cls] = _op
    for _f in _op.functions:
        _BY_FUNCTION[id(_f)] = (_f, _op)  # keep a reference: the id stays valid
    for _name in _op.methods:
        if _name in _BY_METHOD:
            raise RuntimeError(f"method .{_name} is listed by two ops")
        _BY_METHOD[_name] = _op


def get(name: str) -> Op:
    """The op called ``name`` (or one of its aliases).

    Raises:
        UnsupportedOpError: for an unknown name (the error lists the known ones).
    """
    op = _NAMES.get(name) if isinstance(name, str) else None
    if op is None:
        raise UnsupportedOpError(f"unknown op {name!r}; known: {', '.join(sorted(_NAMES))}")
    return op


def find(obj: Any) -> Op | None:
    """The op computed by ``obj``, or ``None``.

    ``obj``: a ``torch.nn`` module instance or class (exact type: a subclass may change
    ``forward``), a ``dualflow.nn.Activation`` or ``dualflow.nn.Functional`` instance, a
    ``torch`` / ``torch.nn.functional`` / ``operator`` callable, or an op name.
    """
    if isinstance(obj, str):
        return _NAMES.get(obj)
    op = getattr(obj, "op", None)
    if isinstance(op, Op):  # dualflow.nn.Activation and Functional carry their op
        return op
    cls = obj if isinstance(obj, type) else type(obj)
    if cls in _BY_MODULE:
        return _BY_MODULE[cls]
    hit = _BY_FUNCTION.get(id(obj))
    return hit[1] if hit is not None and hit[0] is obj else None


def lookup(obj: Any) -> Op:
    """Like :func:`find`, but an op without a rule raises :class:`UnsupportedOpError`.

    For a module instance with parameters (``nn.LeakyReLU(-0.1)``, ``dualflow.nn.Activation``)
    the returned op's ``monotone`` is resolved for those parameters.
    """
    op = find(obj)
    if op is None:
        what = obj.__name__ if isinstance(obj, type) else getattr(obj, "__name__", type(obj).__name__)
        raise UnsupportedOpError(f"no moment rule for {what!r}; see dualflow.ops.OPS for the supported ops")
    params = _instance_params(obj, op)
    if op.elementwise and params is not None and callable(op.monotone):
        return dataclasses.replace(op, monotone=op.is_monotone(params))
    return op


def _instance_params(obj: Any, op: Op) -> dict[str, Any] | None:
    if isinstance(obj, type) or not isinstance(obj, nn.Module):
        return None
    if isinstance(getattr(obj, "op", None), Op):
        return dict(getattr(obj, "params", {}))
    return op.module_params(obj)


def lookup_method(name: str) -> Op:
    """The op of tensor method ``name`` (``x.view``, ``x.relu``, ...)."""
    op = _BY_METHOD.get(name)
    if op is None:
        raise UnsupportedOpError(f"no moment rule for the tensor method .{name}()")
    return op


def is_monotone(obj: Any) -> bool:
    """Whether ``obj`` (module, function or name) is an element-wise non-decreasing op.

    ``False`` for anything the table does not list. The pooling rewrite uses it:
    ``maxpool(f(x)) = f(maxpool(x))`` for such ``f``.
    """
    op = find(obj)
    if op is None or not op.elementwise:
        return False
    params = _instance_params(obj, op)
    return op.is_monotone(params)


def elementwise() -> Iterator[Op]:
    """The element-wise ops (activations), in table order."""
    return (op for op in OPS.values() if op.elementwise)


def activation_names() -> list[str]:
    """Names of the element-wise ops (what :class:`dualflow.nn.Activation` accepts)."""
    return [op.name for op in elementwise()]


def activation(name: str) -> Op:
    """The element-wise op called ``name`` or one of its aliases (``"linear"``: the identity).

    Raises:
        UnsupportedOpError: for a name that is no activation (the error lists them).
    """
    op = _ACT_NAMES.get(name) if isinstance(name, str) else None
    if op is None:
        raise UnsupportedOpError(f"unknown activation {name!r}; known: {', '.join(sorted(_ACT_NAMES))}")
    return op


def gain(name: str) -> float:
    """Initialisation gain of activation ``name`` (``"linear"``/``"identity"``: 1)."""
    return activation(name).gain()


def _form_name(t: Any) -> str:
    if isinstance(t, str):
        return f".{t}()"
    if isinstance(t, type):
        return f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else t.__name__
    mod = getattr(t, "__module__", "") or ""
    short = {"torch.nn.functional": "F", "_operator": "operator", "builtins": ""}.get(mod, "torch")
    name = getattr(t, "__name__", repr(t))
    return f"{short}.{name}" if short else name


def markdown() -> str:
    """The table as a markdown table (name, kind, forms, properties, rule), for the docs."""
    rows = [
        "| op | kind | forms | exact | monotone | linear | rule |",
        "|---|---|---|---|---|---|---|",
    ]
    for op in OPS.values():
        forms = ", ".join(dict.fromkeys(_form_name(t) for t in (*op.modules, *op.functions, *op.methods)))
        mono = "yes" if op.is_monotone() else ""
        rows.append(
            f"| {op.name} | {op.kind} | {forms} | {'yes' if op.exact else 'no'} | {mono} "
            f"| {'yes' if op.linear else ''} | {op.rule} |"
        )
    return "\n".join(rows)
