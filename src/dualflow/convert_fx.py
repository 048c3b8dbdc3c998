"""Convert any ``torch.nn.Module`` to a moment-propagating model through a ``torch.fx`` trace.

:func:`convert` traces the model symbolically, looks every node up in the op table
(:mod:`dualflow.ops`) and returns a :class:`ConvertedModel` that runs the same graph on
:class:`dualflow.Gaussian` activations: ``torch.nn`` layers become ``dualflow.nn`` layers
(weights copied as the means; Gaussian or point weights), functional calls, operators and
tensor methods run the table's moment rules. A node without a rule is never treated as
deterministic: the conversion raises one :class:`dualflow.ops.UnsupportedOpError` naming
every such node, its op and its source line. Data-dependent control flow (``if`` on tensor
values) cannot be traced and raises the same error with its source line.

Approximations are those of the table (``dualflow.ops.OPS[name].rule``); the main one is
mean-field: activations with independent entries, and the two operands of ``+``/``*``
treated as independent (a residual ``x + f(x)`` ignores their correlation; the same value
on both sides, ``x + x``, is handled exactly). With zero weight variances and a point input
the converted model computes the original function (Theorem 2(3)).
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from dualflow import ops
from dualflow.gaussian import check_gaussian
from dualflow.nn.base import BayesLayer, Module, set_checks
from dualflow.nn.convert import layer_kwargs

__all__ = ["ConvertedModel", "convert"]

_TORCH_DIR = os.path.dirname(torch.__file__)


# ============================================================================ plain-data graph


class _Ref:
    """A reference to the value of an earlier step (a graph node), by name."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"%{self.name}"


def _from_fx(a: Any) -> Any:
    """fx node arguments -> the same structure with :class:`_Ref` for nodes."""
    if isinstance(a, fx.Node):
        return _Ref(a.name)
    if isinstance(a, tuple):
        return tuple(_from_fx(x) for x in a)
    if isinstance(a, list):
        return [_from_fx(x) for x in a]
    if isinstance(a, dict):
        return {k: _from_fx(v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_from_fx(a.start), _from_fx(a.stop), _from_fx(a.step))
    return a


def _load(a: Any, env: dict[str, Any]) -> Any:
    if isinstance(a, _Ref):
        return env[a.name]
    if isinstance(a, tuple):
        return tuple(_load(x, env) for x in a)
    if isinstance(a, list):
        return [_load(x, env) for x in a]
    if isinstance(a, dict):
        return {k: _load(v, env) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_load(a.start, env), _load(a.stop, env), _load(a.step, env))
    return a


def _refs(a: Any) -> list[str]:
    out: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, _Ref):
            out.append(x.name)
        elif isinstance(x, (tuple, list)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)
        elif isinstance(x, slice):
            walk(x.start), walk(x.stop), walk(x.step)

    walk(a)
    return out


class _Container(Module):
    """An empty module holding converted submodules at their original paths."""


def _rho_from_var(var: Tensor) -> Tensor:
    """``rho`` with ``softplus(rho)^2 = var`` (``var = 0`` gives ``rho = -inf``)."""
    s = var.clamp_min(0.0).sqrt()
    return s + torch.log(-torch.expm1(-s))


class ConvertedModel(Module):
    """A traced model running on Gaussian activations (made by :func:`convert`).

    ``forward`` takes what the original ``forward`` took, with any tensor input either a
    plain tensor (a point mass) or a :class:`dualflow.Gaussian`; it returns what the original
    returned, with random activations as Gaussians. Inputs are validated once here (finite
    values, non-negative variances) and the per-layer checks are off
    (``dualflow.nn.set_checks(model, True)`` turns them on).

    Submodules keep their original paths (``model.layer1[0].conv1`` is a
    :class:`dualflow.nn.Conv2d`), so ``state_dict`` keys read like the original's
    (``layer1.0.conv1.weight_mu``); parameters and buffers the original's ``forward`` used
    directly live in ``constants`` (point values).

    Attributes:
        steps: the graph as plain data: ``{"name", "op", "target", "args", "kwargs"}`` per
            node, ``op`` one of ``placeholder``, ``get_attr``, ``call_module``, ``call``
            (an op of :data:`dualflow.ops.OPS` named by ``target``) and ``output``.
        source_names: converted parameter name -> the original model's parameter name
            (``layer1.0.conv1.weight_mu`` -> ``layer1.0.conv1.weight``).
    """

    def __init__(self, steps: list[dict[str, Any]], source_names: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.steps = steps
        self.constants = _Container()
        self.source_names = dict(source_names or {})
        self._plan()

    def _plan(self) -> None:
        """Precompute, per step, the values that can be freed after it (last use)."""
        last: dict[str, int] = {}
        for i, st in enumerate(self.steps):
            for r in _refs(st["args"]) + _refs(st["kwargs"]):
                last[r] = i
        self._free: list[list[str]] = [[] for _ in self.steps]
        for name, i in last.items():
            self._free[i].append(name)
        self._inputs = [st for st in self.steps if st["op"] == "placeholder"]
        self._ops = [ops.get(st["target"]) if st["op"] == "call" else None for st in self.steps]

    def add_submodule(self, path: str, module: nn.Module) -> None:
        """Place ``module`` at dotted ``path``, creating empty containers on the way."""
        parent: nn.Module = self
        *heads, leaf = path.split(".")
        for h in heads:
            if not hasattr(parent, h) or not isinstance(getattr(parent, h), nn.Module):
                parent.add_module(h, _Container())
            parent = getattr(parent, h)
        parent.add_module(leaf, module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        env: dict[str, Any] = {}
        if len(args) > len(self._inputs):
            raise TypeError(f"expected at most {len(self._inputs)} inputs, got {len(args)}")
        for i, st in enumerate(self._inputs):
            name = st["target"]
            if i < len(args):
                val = args[i]
            elif name in kwargs:
                val = kwargs.pop(name)
            elif st["args"]:
                val = st["args"][0]  # the default of the original forward
            else:
                raise TypeError(f"missing input {name!r}")
            if self.check_inputs and isinstance(val, (Tensor, tuple)) and _is_float_input(val):
                check_gaussian(val, f"input {name!r}")
            env[st["name"]] = val
        if kwargs:
            raise TypeError(f"unexpected inputs {sorted(kwargs)}")
        for st, op, free in zip(self.steps, self._ops, self._free):
            kind = st["op"]
            if kind == "placeholder":
                continue
            if kind == "output":
                return _load(st["args"][0], env)
            if kind == "get_attr":
                out = getattr(self.constants, st["target"])
            else:
                a, k = _load(st["args"], env), _load(st["kwargs"], env)
                out = op(*a, **k) if op is not None else self.get_submodule(st["target"])(*a, **k)
            env[st["name"]] = out
            for name in free:
                env.pop(name, None)
        raise RuntimeError("the graph has no output")

    def graph_repr(self) -> str:
        """One line per step: ``name = op target(args, kwargs)``."""
        lines = []
        for st in self.steps:
            lines.append(f"{st['name']} = {st['op']} {st['target']}{tuple(st['args'])} {st['kwargs'] or ''}")
        return "\n".join(lines)


def _is_float_input(x: Any) -> bool:
    m = x.mean if hasattr(x, "mean") and isinstance(x, tuple) else x
    return isinstance(m, Tensor) and m.is_floating_point()


# ============================================================================ tracing


class _Tracer(fx.Tracer):
    """The default fx tracer (``torch.nn`` modules are leaves) that records source lines."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)\n\s*(?P<code>[^\n]*)')


def _where(node: fx.Node) -> str:
    """``file:line in fn: code`` of the user's source line that created ``node``."""
    st = node.meta.get("stack_trace") or node.stack_trace or ""
    frames = [m for m in _FRAME.finditer(st) if not m["file"].startswith(_TORCH_DIR)]
    if not frames:
        return "source line unknown"
    f = frames[-1]
    return f"{f['file']}:{f['line']} in {f['fn']}: {f['code'].strip()}"


def _trace_error_where(err: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if not f.filename.endswith(os.path.join("dualflow", "convert_fx.py"))]
    if not frames:
        return "source line unknown"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        return f"module {node.target!r} ({type(mod).__module__}.{type(mod).__name__})"
    if node.op == "call_method":
        return f"tensor method .{node.target}()"
    t = node.target
    mod = getattr(t, "__module__", None) or "builtins"
    return f"function {mod}.{getattr(t, '__name__', repr(t))}"


def _trace(model: nn.Module, concrete_args: dict[str, Any] | None) -> fx.Graph:
    before = set(vars(model))
    tracer = _Tracer()
    try:
        graph = tracer.trace(model, concrete_args)
    except fx.proxy.TraceError as e:
        raise ops.UnsupportedOpError(
            f"cannot convert {type(model).__name__}: data-dependent control flow (a Python `if`/`while`/"
            f"bool() on tensor values) has no moment rule, at {_trace_error_where(e)}. Make the branch "
            "independent of tensor values, or pass it as concrete_args."
        ) from None
    finally:
        # fx stores tensor constants created in forward on the root: keep the user's model as it was
        added = {k: getattr(model, k) for k in set(vars(model)) - before}
        for k in added:
            delattr(model, k)
    graph._dualflow_constants = added  # type: ignore[attr-defined]
    return graph


# ============================================================================ resolving nodes


def _node_op(node: fx.Node, root: nn.Module) -> ops.Op | None:
    if node.op == "call_module":
        return ops.find(type(root.get_submodule(node.target)))
    if node.op == "call_function":
        return ops.find(node.target)
    if node.op == "call_method":
        try:
            return ops.lookup_method(node.target)
        except ops.UnsupportedOpError:
            return None
    return None


def _node_params(node: fx.Node, op: ops.Op, root: nn.Module) -> dict[str, Any]:
    """Parameters of an element-wise node (module attributes or call arguments)."""
    if node.op == "call_module":
        return op.module_params(root.get_submodule(node.target))
    _, params = op.bind(*node.args, **node.kwargs)
    return params


def _problem(node: fx.Node, op: ops.Op | None, root: nn.Module) -> str | None:
    """Why ``node`` cannot be converted, or ``None``."""
    if node.op in ("placeholder", "output", "get_attr"):
        return None
    if op is None:
        return "no moment rule"
    try:
        if node.op == "call_module":
            mod = root.get_submodule(node.target)
            if op.to_module is None:
                return f"no module rule for {type(mod).__name__}"
            if op.elementwise:
                _plain_params(op.module_params(mod))
            elif op.kind == "layer":
                op.to_module(mod, bayes=False)  # raises for unsupported settings (padding_mode, ...)
            else:
                op.to_module(mod)  # raises for unsupported settings (ceil_mode, ...)
            return None
        if op.elementwise:
            _plain_params(_node_params(node, op, root))
        elif op.check is not None:
            op.check(*node.args, **node.kwargs)
        if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("__"):
            src = node.args[0]
            if isinstance(src, fx.Node) and any(u is not node and _after(u, node) for u in src.users):
                return f"the in-place .{node.target}() changes a value used later (write it out of place)"
    except ops.UnsupportedOpError as e:
        return str(e)
    except (TypeError, KeyError) as e:
        return f"arguments without a rule ({e})"
    return None


def _after(a: fx.Node, b: fx.Node) -> bool:
    n = b.next
    while n.op != "root":
        if n is a:
            return True
        n = n.next
    return False


def _plain_params(params: Mapping[str, Any]) -> None:
    for k, v in params.items():
        if isinstance(v, (fx.Node, Tensor)):
            raise ops.UnsupportedOpError(f"parameter {k} must be a constant number, not a tensor")


# ============================================================================ the pooling rewrite


def _is_maxpool(node: fx.Node, root: nn.Module) -> bool:
    op = _node_op(node, root) if node.op in ("call_module", "call_function") else None
    return op is not None and op.name == "max_pool2d"


def _monotone_node(node: Any, root: nn.Module) -> bool:
    if not isinstance(node, fx.Node) or node.op not in ("call_module", "call_function", "call_method"):
        return False
    op = _node_op(node, root)
    if op is None or not op.elementwise:
        return False
    try:
        return op.is_monotone(_node_params(node, op, root))
    except (ops.UnsupportedOpError, TypeError, KeyError):
        return False


def pool_before_activation(graph: fx.Graph, root: nn.Module) -> int:
    """Rewrite ``maxpool(f(x))`` to ``f(maxpool(x))`` for every monotone element-wise ``f``.

    The same function (``max_i f(x_i) = f(max_i x_i)`` for non-decreasing ``f``; padded
    positions never win either max), and far more accurate moments: Clark's maxima are
    accurate on Gaussian windows, poor on rectified ones (docs/maths.md section 1.3). Which ops are
    monotone: the op table's ``monotone`` property, which :func:`dualflow.nn.rewrite.is_monotone`
    (the same rewrite on ``Sequential`` containers) reads too. ``f`` stays
    in place for its other users. Repeats until no pool follows a monotone op.

    Returns:
        The number of rewrites.
    """
    count = 0
    changed = True
    while changed:
        changed = False
        for pool in list(graph.nodes):
            if not _is_maxpool(pool, root):
                continue
            act = pool.args[0] if pool.args else pool.kwargs.get("input")
            if not _monotone_node(act, root):
                continue
            pre = act.args[0] if act.args else act.kwargs.get("input")
            if not isinstance(pre, fx.Node):
                continue
            with graph.inserting_after(pool):
                new_pool = graph.node_copy(pool, lambda n, a=act, p=pre: p if n is a else n)
            with graph.inserting_after(new_pool):
                new_act = graph.node_copy(act, lambda n, p=pre, q=new_pool: q if n is p else n)
            pool.replace_all_uses_with(new_act)
            graph.erase_node(pool)
            if not act.users:
                graph.erase_node(act)
            count += 1
            changed = True
            break
    graph.lint()
    return count


# ============================================================================ convert


def _set_variances(layer: BayesLayer, prefix: str, weight_var: Any, used: set[str]) -> None:
    for attr in ("weight", "bias"):
        rho = getattr(layer, f"{attr}_rho", None)
        if rho is None:
            continue
        key = f"{prefix}{attr}"
        if isinstance(weight_var, Mapping):
            if key not in weight_var:
                continue
            val = weight_var[key]
            used.add(key)
        elif callable(weight_var):
            val = weight_var(key, rho.shape)
            if val is None:
                continue
        else:
            val = weight_var
        var = torch.as_tensor(val, dtype=rho.dtype, device=rho.device)
        if not bool(torch.isfinite(var).all()) or bool((var < 0).any()):
            raise ValueError(f"weight_var[{key!r}] must be finite and >= 0")
        with torch.no_grad():
            rho.copy_(_rho_from_var(var).expand_as(rho))


def convert(
    model: nn.Module,
    bayes: bool = True,
    *,
    weight_var: float | Mapping[str, Tensor | float] | Callable[[str, torch.Size], Any] | None = None,
    init_var_ratio: float = 0.01,
    prior_var: float | None = None,
    gain: float | None = None,
    pool_rewrite: bool = True,
    concrete_args: dict[str, Any] | None = None,
) -> ConvertedModel:
    """Convert any ``nn.Module`` to a moment-propagating :class:`ConvertedModel` via ``torch.fx``.

    Every node of the traced graph is looked up in the op table (:data:`dualflow.ops.OPS`):
    ``torch.nn`` layers become ``dualflow.nn`` layers whose weight means are the original
    weights; BatchNorm becomes :class:`dualflow.nn.BatchNorm2d` (an exact affine map in eval
    mode), LayerNorm, pooling, dropout, activations, ``+``/``*``/``torch.cat``/views/means
    run the table's rules. The model is traced in its current train/eval mode and the
    converted model starts in the same mode.

    Args:
        model: any module ``torch.fx`` can trace symbolically.
        bayes: Gaussian weights (``True``) or point weights (``False``) in the weight layers.
        weight_var: the weight variances (``bayes=True``): ``None`` for the layers' initial
            rule (``init_var_ratio * gain^2 / fan_in``); a number for every weight and bias; a
            mapping from the *original* parameter names (``"layer1.0.conv1.weight"``) to
            variances (scalars or tensors of the parameter's shape; parameters not in it keep
            the initial rule); or ``weight_var(name, shape) -> variance | None``.
        init_var_ratio, prior_var, gain: passed to every weight layer (see
            :class:`dualflow.nn.Linear`; ``None`` keeps the layer defaults).
        pool_rewrite: pool pre-activations (:func:`pool_before_activation`).
        concrete_args: passed to the tracer (fixes non-tensor inputs, e.g. flags).

    Returns:
        :class:`ConvertedModel`.

    Raises:
        dualflow.ops.UnsupportedOpError: one error listing every node without a rule (node
            name, op, source line), or the source line of data-dependent control flow.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    if not bayes and weight_var is not None:
        raise ValueError("weight_var needs bayes=True (point weights have no variance)")
    source_model = model
    prefix = ""
    if ops.find(type(model)) is not None:  # a bare layer: trace a call of it
        model, prefix = _Root(model), "module."
    graph = _trace(model, concrete_args)
    constants: dict[str, Any] = graph._dualflow_constants  # type: ignore[attr-defined]
    problems = []
    for node in graph.nodes:
        why = _problem(node, _node_op(node, model), model)
        if why is not None:
            problems.append(f"  node {node.name!r}: {_describe(node, model)}: {why}\n    at {_where(node)}")
    if problems:
        raise ops.UnsupportedOpError(
            f"cannot convert {type(source_model).__name__}: {len(problems)} operation(s) without a "
            "moment rule (dualflow.ops.OPS lists the supported ones):\n" + "\n".join(problems)
        )
    if pool_rewrite:
        pool_before_activation(graph, model)

    kw: dict[str, Any] = {"init_var_ratio": init_var_ratio, "prior_var": prior_var}
    if gain is not None:
        kw["gain"] = gain
    steps: list[dict[str, Any]] = []
    modules: dict[str, nn.Module] = {}
    attrs: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    used_var: set[str] = set()
    for node in graph.nodes:
        op = _node_op(node, model)
        step = {"name": node.name, "op": node.op, "target": node.target, "args": _from_fx(node.args)}
        step["kwargs"] = _from_fx(dict(node.kwargs))
        if node.op == "call_module":
            path = node.target
            if path not in modules:
                mod = model.get_submodule(path)
                new = (
                    op.to_module(mod, **layer_kwargs(bayes, **kw))
                    if op.kind == "layer"
                    else op.to_module(mod)
                )
                if isinstance(new, BayesLayer):
                    orig = path.removeprefix("module").lstrip(".") if prefix else path
                    pre = f"{orig}." if orig else ""
                    if bayes and weight_var is not None:
                        _set_variances(new, pre, weight_var, used_var)
                    for p in ("weight", "bias"):
                        source[f"{path}.{p}_mu"] = f"{pre}{p}"
                        source[f"{path}.{p}_rho"] = f"{pre}{p}"
                new.train(mod.training)
                modules[path] = new
        elif node.op in ("call_function", "call_method"):
            train_mod = op.train_module(*node.args, **node.kwargs) if op.train_module is not None else None
            if train_mod is not None:
                path = f"fx_{node.name}"
                train_mod.train(model.training)
                modules[path] = train_mod
                step.update(op="call_module", target=path)
                if isinstance(node.args[0] if node.args else None, fx.Node):
                    step["args"], step["kwargs"] = (_Ref(node.args[0].name),), {}
                else:
                    step["args"], step["kwargs"] = (_Ref(node.kwargs["input"].name),), {}
            else:
                step.update(op="call", target=op.name)
        elif node.op == "get_attr":
            key = node.target.replace(".", "__")
            if key not in attrs:
                attrs[key] = _fetch_attr(model, node.target, constants)
            step["target"] = key
        elif node.op == "placeholder":
            step["args"] = tuple(node.args)  # the default value, if any
        steps.append(step)
    if isinstance(weight_var, Mapping):
        unknown = sorted(k for k in set(weight_var) - used_var if not _is_param(source_model, k))
        if unknown:
            raise ValueError(f"weight_var names no parameter of the model: {unknown[:5]}")
    out = ConvertedModel(steps, source)
    for path, mod in modules.items():
        out.add_submodule(path, mod)
    for key, val in attrs.items():
        if isinstance(val, nn.Parameter):
            out.constants.register_parameter(key, nn.Parameter(val.detach().clone(), val.requires_grad))
        elif isinstance(val, Tensor):
            out.constants.register_buffer(key, val.detach().clone())
        else:
            raise ops.UnsupportedOpError(f"attribute {key!r} of type {type(val).__name__} is not a tensor")
    set_checks(out, False)
    out.check_inputs = True
    out.train(source_model.training)
    return out


class _Root(nn.Module):
    """A module calling one layer, so that a bare layer is traced as a call of it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Any) -> Any:
        return self.module(x)


def _is_param(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


def _fetch_attr(model: nn.Module, target: str, constants: Mapping[str, Any]) -> Any:
    if target in constants:
        return constants[target]
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
