"""Convert a ``torch.nn`` module tree (``nn.Sequential`` of layers) to ``dualflow.nn`` modules.

Every rule comes from the op table (:mod:`dualflow.ops`): a module class without an entry
raises :class:`dualflow.ops.UnsupportedOpError` naming it; nothing is skipped silently.
Models with their own ``forward`` (residual blocks, functional calls) need the graph
converter :func:`dualflow.convert`, which reads the same table.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dualflow import ops
from dualflow.nn import structure

__all__ = ["from_torch", "layer_kwargs"]


def layer_kwargs(bayes: bool, **kw: Any) -> dict[str, Any]:
    """Keyword arguments of the converted weight layers (``bayes``, ``prior_var``, ...)."""
    return {"bayes": bool(bayes), **kw}


def convert_module(module: nn.Module, bayes: bool = True, **kw: Any) -> nn.Module:
    """One ``torch.nn`` leaf module as a ``dualflow.nn`` module, by its op-table entry."""
    op = ops.find(type(module))
    if op is None or op.to_module is None:
        raise ops.UnsupportedOpError(
            f"no moment-propagation rule for {type(module).__module__}.{type(module).__name__}; "
            f"supported modules: {sorted(t.__name__ for o in ops.OPS.values() for t in o.modules)}"
        )
    if op.kind == "layer":
        return op.to_module(module, **layer_kwargs(bayes, **kw))
    return op.to_module(module)


def from_torch(module: nn.Module, bayes: bool = True, **layer_kw: Any) -> nn.Module:
    """Convert a ``torch.nn`` module tree (``Sequential`` of supported layers) to ``dualflow.nn``.

    Weight and bias values become the means of the new layers; with ``bayes=True`` the
    variances start at the layer's initial variance (see :class:`dualflow.nn.Linear`).
    ``layer_kw`` (``prior_var``, ``init_var_ratio``, ``gain``) goes to every weight layer.

    Raises:
        dualflow.ops.UnsupportedOpError: (a ``NotImplementedError``) for any module without a
            rule in :data:`dualflow.ops.OPS`, including modules with a custom ``forward``
            (convert those with :func:`dualflow.convert`).
    """
    if isinstance(module, nn.Sequential):
        return structure.Sequential(*[from_torch(c, bayes=bayes, **layer_kw) for c in module])
    try:
        return convert_module(module, bayes, **layer_kw)
    except ops.UnsupportedOpError as e:
        if ops.find(type(module)) is None and type(module).forward is not nn.Module.forward:
            raise ops.UnsupportedOpError(
                f"{e} (a module with its own forward: use dualflow.convert)"
            ) from None
        raise
