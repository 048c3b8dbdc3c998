"""Save and load dualflow models: architecture as plain data, plus the state.

:func:`save` writes one ``torch.save`` file holding ``{"format", "version", "kind", "spec",
"state_dict"}``: ``spec`` is a JSON string describing the architecture, and every tensor
lives in ``state_dict``, so :func:`load` reads it with ``torch.load(..., weights_only=True)``
(no pickled code runs) and rebuilds the model. Kinds:

* ``"registry"``: a :func:`dualflow.models.create` model (its ``config``);
* ``"graph"``: a :func:`dualflow.convert` result (its steps and submodules);
* ``"modules"``: a tree of ``dualflow.nn`` modules (``Sequential`` of layers, e.g. from
  :func:`dualflow.methods.mlp_builder` or :func:`dualflow.nn.from_torch`);
* ``"method"``: a :class:`dualflow.methods.Method` (name, task, its :class:`~dualflow.methods.Traits`,
  prediction samples, its network's spec).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dualflow import nn as dnn

__all__ = ["load", "save", "spec"]

FORMAT = "dualflow"
VERSION = 2  # 2: a method is saved with its Traits (1: registry options)


# ============================================================================ JSON encoding


def _enc(x: Any) -> Any:
    """Python values of graph arguments -> JSON (tagged dicts for what JSON lacks)."""
    from dualflow.convert_fx import _Ref

    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else {"__float__": repr(x)}
    if isinstance(x, _Ref):
        return {"__ref__": x.name}
    if isinstance(x, tuple):
        return {"__tuple__": [_enc(y) for y in x]}
    if isinstance(x, list):
        return [_enc(y) for y in x]
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise TypeError(f"cannot save a dict with non-string keys: {list(x)[:3]}")
        return {"__dict__": {k: _enc(v) for k, v in x.items()}}
    if isinstance(x, slice):
        return {"__slice__": [_enc(x.start), _enc(x.stop), _enc(x.step)]}
    if x is Ellipsis:
        return {"__ellipsis__": True}
    if isinstance(x, torch.dtype):
        return {"__dtype__": str(x).removeprefix("torch.")}
    if isinstance(x, torch.device):
        return {"__device__": str(x)}
    if isinstance(x, torch.Size):
        return {"__size__": list(x)}
    raise TypeError(f"cannot save a value of type {type(x).__name__} in an architecture spec")


def _dec(x: Any) -> Any:
    from dualflow.convert_fx import _Ref

    if isinstance(x, list):
        return [_dec(y) for y in x]
    if not isinstance(x, dict):
        return x
    (tag, val), *_ = x.items()
    if tag == "__float__":
        return float(val)
    if tag == "__ref__":
        return _Ref(val)
    if tag == "__tuple__":
        return tuple(_dec(y) for y in val)
    if tag == "__dict__":
        return {k: _dec(v) for k, v in val.items()}
    if tag == "__slice__":
        return slice(*[_dec(y) for y in val])
    if tag == "__ellipsis__":
        return Ellipsis
    if tag == "__dtype__":
        return getattr(torch, val)
    if tag == "__device__":
        return torch.device(val)
    if tag == "__size__":
        return torch.Size(val)
    raise ValueError(f"unknown tag {tag!r} in a saved architecture")


# ============================================================================ module specs


def _bayes_kw(m: dnn.BayesLayer) -> dict[str, Any]:
    pv = m.prior_var
    return {
        "bias": m.bias_mu is not None,
        "bayes": m.bayes,
        "prior_var": float(pv) if isinstance(pv, (int, float)) else None,
        "init_var_ratio": m.init_var_ratio,
        "gain": m.gain,
        "dtype": str(m.weight_mu.dtype).removeprefix("torch."),
    }


def _conv_kw(m: Any) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": m.kernel_size,
        "stride": m.stride,
        "padding": m.padding,
        "dilation": m.dilation,
        "groups": m.groups,
        **_bayes_kw(m),
    }


def _activation_kw(m: dnn.Activation) -> dict[str, Any]:
    if m.op is None:
        raise TypeError(f"cannot save Activation({m.name}): a custom callable is not plain data")
    return {"fn": m.name, "method": m.method, "nodes": m.nodes, **m.params}


#: dualflow.nn class -> its constructor arguments read from an instance. Containers
#: (``Sequential``, ``Residual``) also list their children.
_SPECS: dict[type, Callable[[Any], dict[str, Any]]] = {
    dnn.Linear: lambda m: {"in_features": m.in_features, "out_features": m.out_features, **_bayes_kw(m)},
    dnn.Conv1d: _conv_kw,
    dnn.Conv2d: _conv_kw,
    dnn.BatchNorm1d: lambda m: {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.weight is not None,
    },
    dnn.BatchNorm2d: lambda m: {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.weight is not None,
    },
    dnn.LayerNorm: lambda m: {
        "normalized_shape": m.normalized_shape,
        "eps": m.eps,
        "elementwise_affine": m.weight is not None,
        "method": getattr(m, "method", "mean"),
    },
    dnn.ReLU: lambda m: {"method": m.method},
    dnn.Activation: _activation_kw,
    dnn.GELU: lambda m: {"method": m.method, "nodes": m.nodes},
    dnn.SiLU: lambda m: {"method": m.method, "nodes": m.nodes},
    dnn.Tanh: lambda m: {"method": m.method, "nodes": m.nodes},
    dnn.Sigmoid: lambda m: {"method": m.method, "nodes": m.nodes},
    dnn.ELU: lambda m: {"method": m.method, "nodes": m.nodes},
    dnn.Softplus: lambda m: {"method": m.method, "nodes": m.nodes},
    dnn.MaxPool2d: lambda m: {
        "kernel_size": m.kernel_size,
        "stride": m.stride,
        "padding": m.padding,
        "method": m.method,
        "temperature": m.temperature,
    },
    dnn.AvgPool2d: lambda m: {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding},
    dnn.GlobalAvgPool2d: lambda m: {},
    dnn.Flatten: lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim},
    dnn.Reshape: lambda m: {"shape": list(m.shape)},
    dnn.Identity: lambda m: {},
    dnn.Dropout: lambda m: {"p": m.p, "mc": m.mc},
    dnn.Functional: lambda m: {"name": m.op.name, **m.params},
    dnn.Concat: lambda m: {"dim": m.dim},
    dnn.Add: lambda m: {},
    dnn.Product: lambda m: {},
    dnn.AddNoise: lambda m: {"noise_var": 1.0},  # the value is in the state dict
    dnn.Sequential: lambda m: {},
    dnn.Residual: lambda m: {},
}


def _register_posthoc() -> None:
    from dualflow import posthoc

    for cls in (posthoc.LinearizedLinear, posthoc.LinearizedConv1d, posthoc.LinearizedConv2d):
        base = next(b for b in cls.__mro__ if b in _SPECS)  # the dualflow.nn layer it extends
        _SPECS[cls] = _SPECS[base]


_register_posthoc()
_CLASSES = {cls.__name__: cls for cls in _SPECS}


def module_spec(m: nn.Module) -> dict[str, Any]:
    """A ``dualflow.nn`` module tree as plain data (class name, arguments, children)."""
    cls = type(m)
    if cls not in _SPECS:
        raise TypeError(
            f"cannot save the architecture of {cls.__module__}.{cls.__name__}: no spec for it "
            f"(supported: {sorted(_CLASSES)}, registry models, converted models and methods)"
        )
    out: dict[str, Any] = {"class": cls.__name__, "kwargs": _SPECS[cls](m)}
    if isinstance(m, dnn.Sequential):
        out["children"] = [module_spec(c) for c in m]
    elif isinstance(m, dnn.Residual):
        out["children"] = [module_spec(m.block), module_spec(m.shortcut)]
    out["training"] = m.training
    return out


def build_module(s: dict[str, Any]) -> nn.Module:
    """Inverse of :func:`module_spec` (fresh parameters; load the state dict after)."""
    name = s["class"]
    if name not in _CLASSES:
        raise ValueError(f"unknown module class {name!r} in a saved architecture")
    cls = _CLASSES[name]
    kw = dict(s["kwargs"])
    if "dtype" in kw:
        kw["dtype"] = getattr(torch, kw["dtype"])
    if cls is dnn.Sequential:
        mod = cls(*[build_module(c) for c in s["children"]])
    elif cls is dnn.Residual:
        mod = cls(build_module(s["children"][0]), build_module(s["children"][1]))
    elif cls is dnn.Reshape:
        mod = cls(*kw["shape"])
    elif cls is dnn.Functional:
        mod = cls(kw.pop("name"), **kw)
    elif cls is dnn.Activation:
        mod = cls(kw.pop("fn"), **kw)
    else:
        mod = cls(**kw)
    mod.train(s.get("training", False))
    return mod


# ============================================================================ architectures


def _graph_spec(model: Any) -> dict[str, Any]:
    from dualflow.convert_fx import _Container

    modules: dict[str, Any] = {}
    for path, mod in model.named_modules():
        if not path or path == "constants" or isinstance(mod, _Container):
            continue
        if any(path.startswith(p + ".") for p in modules):
            continue  # inside a saved module (its spec has its children)
        modules[path] = module_spec(mod)
    consts = {}
    for key, t in [
        *model.constants.named_parameters(recurse=False),
        *model.constants.named_buffers(recurse=False),
    ]:
        consts[key] = {
            "parameter": isinstance(t, nn.Parameter),
            "requires_grad": t.requires_grad,
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
        }
    steps = [{**st, "args": _enc(st["args"]), "kwargs": _enc(st["kwargs"])} for st in model.steps]
    return {"steps": steps, "modules": modules, "constants": consts, "source_names": model.source_names}


def _build_graph(s: dict[str, Any]) -> nn.Module:
    from dualflow.convert_fx import ConvertedModel

    steps = [{**st, "args": _dec(st["args"]), "kwargs": _dec(st["kwargs"])} for st in s["steps"]]
    out = ConvertedModel(steps, s.get("source_names"))
    for path, ms in s["modules"].items():
        out.add_submodule(path, build_module(ms))
    for key, c in s["constants"].items():
        t = torch.zeros(c["shape"], dtype=getattr(torch, c["dtype"]))
        if c["parameter"]:
            out.constants.register_parameter(key, nn.Parameter(t, c["requires_grad"]))
        else:
            out.constants.register_buffer(key, t)
    dnn.set_checks(out, False)
    out.check_inputs = True
    return out


def _net_spec(model: nn.Module) -> dict[str, Any]:
    from dualflow.convert_fx import ConvertedModel
    from dualflow.models import ImageClassifier

    if isinstance(model, ImageClassifier):
        return {"kind": "registry", "config": _enc(dict(model.config))}
    if isinstance(model, ConvertedModel):
        return {"kind": "graph", "graph": _graph_spec(model)}
    return {"kind": "modules", "module": module_spec(model)}


def _build_net(s: dict[str, Any]) -> nn.Module:
    kind = s["kind"]
    if kind == "registry":
        from dualflow import models

        return models.create(**_dec(s["config"]))
    if kind == "graph":
        return _build_graph(s["graph"])
    if kind == "modules":
        return build_module(s["module"])
    raise ValueError(f"unknown architecture kind {kind!r}")


#: optimizer factories of :class:`dualflow.methods.Traits` that a saved method may name
_OPTIMIZERS = ("ConfigOptimizer", "NaturalGradientOptimizer")


def _traits_spec(traits: Any) -> dict[str, Any]:
    """A :class:`dualflow.methods.Traits` record as plain data (its optimizer by class name)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(traits):
        value = getattr(traits, f.name)
        if f.name == "optimizer":
            cls = type(value).__name__
            if cls not in _OPTIMIZERS:
                raise TypeError(
                    f"cannot save a method whose optimizer factory is {cls}: only {', '.join(_OPTIMIZERS)} "
                    "have a plain-data description"
                )
            value = {"class": cls, **{g.name: getattr(value, g.name) for g in dataclasses.fields(value)}}
        out[f.name] = value
    return out


def _build_traits(s: dict[str, Any]) -> Any:
    from dualflow.methods import traits as traits_module

    s = dict(s)
    opt = dict(s.pop("optimizer"))
    cls = opt.pop("class")
    if cls not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer factory {cls!r} in a saved method")
    if "betas" in opt:
        opt["betas"] = tuple(opt["betas"])
    return traits_module.Traits(optimizer=getattr(traits_module, cls)(**opt), **s)


def _method_spec(m: Any) -> dict[str, Any]:
    """A :class:`dualflow.methods.Method`: its name, task, traits, prediction samples, whether
    the noise variance is learned (a parameter or a buffer: the state dict's shape), and the
    architecture of its first network (every member has the same one: built by one builder, or
    deep copies of one module); the weights of every member come from the state dict."""
    learn = None
    if m.likelihoods is not None:
        learn = isinstance(m.likelihoods[0].raw_noise, torch.nn.Parameter)
    return {
        "kind": "method",
        "name": m.name,
        "task": m.task,
        "traits": _enc(_traits_spec(m.traits)),
        "samples": m.samples,
        "learn_noise": learn,
        "net": _net_spec(m.net),
    }


def spec(obj: nn.Module) -> dict[str, Any]:
    """The architecture of ``obj`` as plain (JSON-able) data; :func:`load` rebuilds from it."""
    from dualflow.methods import Method

    if isinstance(obj, Method):
        return _method_spec(obj)
    return _net_spec(obj)


def _build(s: dict[str, Any]) -> nn.Module:
    if s["kind"] != "method":
        return _build_net(s)
    from dualflow.methods import Method

    net = s["net"]

    def build(bayes: bool, dropout: float = 0.0) -> nn.Module:
        return _build_net(net)  # the saved network already has the method's weights/dropout

    learn = s["learn_noise"]
    return Method(
        _build_traits(_dec(s["traits"])),
        build,
        s["task"],
        samples=s["samples"],
        learn_noise=True if learn is None else bool(learn),
        name=s["name"],
    )


# ============================================================================ save / load


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Save ``model`` (architecture and state) to ``path``; :func:`load` restores it.

    Args:
        model: a registry model (:func:`dualflow.models.create`), a converted model
            (:func:`dualflow.convert`), a tree of ``dualflow.nn`` modules, or a method of
            :mod:`dualflow.methods`.
        path: output file (its folder must exist or be creatable).

    Raises:
        TypeError: for a model whose architecture has no plain-data description (the message
            names the module).
    """
    arch = spec(model)  # fails before anything is written
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "spec": json.dumps(arch),
        "training": model.training,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Load a model written by :func:`save` (``torch.load(..., weights_only=True)``).

    Returns:
        The model in the train/eval mode it was saved in, on ``map_location``.

    Raises:
        FileNotFoundError: no such file. ValueError: not a dualflow file, or a newer version.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no saved model at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a corrupt or foreign file
        raise ValueError(f"{path}: not a file written by dualflow.save ({e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a file written by dualflow.save")
    if int(payload.get("version", 0)) > VERSION:
        raise ValueError(f"{path}: written by a newer dualflow (format version {payload['version']})")
    arch = json.loads(payload["spec"])
    if arch.get("kind") == "method" and "traits" not in arch:
        raise ValueError(
            f"{path}: a method saved by an older dualflow (format version 1, before methods were "
            "traits); load its network and build the method again"
        )
    model = _build(arch)
    # assign=True keeps the saved dtypes (a float64 model stays float64)
    model.load_state_dict(payload["state_dict"], assign=True)
    model.train(bool(payload.get("training", False)))
    return model
