"""Function-identical rewrites of module sequences that make moment propagation more accurate.

**Pool before the activation.** For any non-decreasing element-wise ``f``,
``max(f(a), f(b)) = f(max(a, b))``: max pooling commutes with ``f``. A network that applies
``f`` and then max-pools computes exactly the same function when it max-pools the
pre-activations and applies ``f`` after. Its *moments* are far more accurate that way: the
max-of-Gaussians rules are built for Gaussian inputs, and the pre-activations are close to
Gaussian, while rectified ones are not (on a Conv-ReLU-MaxPool stack the pooled variance
error falls by more than 40%: ``tests/test_pooling.py``; ``benchmarks/bench_moments.py``
measures whole networks). The
activation then also runs on a 4x smaller map (2x2 pooling).

:class:`dualflow.nn.Sequential` applies :func:`pool_before_activation` when it is
constructed (``Sequential(..., pool_first=False)`` opts out). Only parameter- and buffer-free
modules change places, so ``state_dict`` keys stay the same and checkpoints of either order
load into the other; the position names of the container stay where they were (module ``2``
may now be the pool).

:func:`is_monotone` answers which modules are non-decreasing element-wise functions from
the op table's ``monotone`` property (:func:`dualflow.ops.is_monotone`), the same property the
``torch.fx`` converter's rewrite (:func:`dualflow.convert_fx.pool_before_activation`) reads.
"""

from __future__ import annotations

import itertools

import torch

from dualflow import ops
from dualflow.nn.layers import Conv2d
from dualflow.nn.norm import BatchNorm2d
from dualflow.nn.pooling import MaxPool2d

__all__ = ["is_monotone", "pool_before_activation", "window_plan"]


def is_monotone(module: torch.nn.Module) -> bool:
    """Whether ``module`` applies one non-decreasing function to every element of its input.

    Reads the op table (:func:`dualflow.ops.is_monotone`, resolved for the module's parameters):
    e.g. :class:`dualflow.nn.ReLU` (either moment rule), ``tanh``, ``sigmoid``, ``elu``,
    ``softplus``, ``relu6``, ``hardtanh`` (not GELU, SiLU, mish or hardswish, which dip below 0),
    ``LeakyReLU`` with a slope >= 0, ``ELU`` with ``alpha >= 0``, the ``torch.nn`` modules as well
    as :class:`dualflow.nn.Activation`; plus :class:`dualflow.nn.Identity`. False for anything
    the table does not list as element-wise, including modules with randomness (dropout) and
    :class:`dualflow.nn.Activation` of an arbitrary callable.
    """
    from dualflow.nn.structure import Identity

    return isinstance(module, Identity) or ops.is_monotone(module)


def _is_max_pool(module: torch.nn.Module) -> bool:
    return isinstance(module, MaxPool2d | torch.nn.MaxPool2d | torch.nn.MaxPool1d)


def _stateless(module: torch.nn.Module) -> bool:
    return next(module.parameters(), None) is None and next(module.buffers(), None) is None


def _tail(module: torch.nn.Module) -> tuple[torch.nn.Sequential, str] | None:
    """``(container, name)`` of the last module of a (nested) sequential, or ``None``."""
    if not isinstance(module, torch.nn.Sequential) or len(module) == 0:
        return None
    name = list(module._modules)[-1]
    inner = _tail(module._modules[name])
    return inner if inner is not None else (module, name)


def pool_before_activation(seq: torch.nn.Sequential) -> int:
    """Move every max pool of ``seq`` in front of the monotone activations that feed it, in place.

    ``[..., f, MaxPool] -> [..., MaxPool, f]`` for every ``f`` with :func:`is_monotone`,
    repeatedly (``[f, g, MaxPool] -> [MaxPool, f, g]``), also where ``f`` is the last module
    of a nested ``Sequential`` just before the pool. Both modules must be parameter- and
    buffer-free, so the ``state_dict`` keys are unchanged. The computed function is
    unchanged (see the module docstring).

    Returns:
        The number of swaps made.
    """
    swaps = 0
    changed = True
    while changed:
        changed = False
        names = list(seq._modules)
        for prev, cur in itertools.pairwise(names):
            pool = seq._modules[cur]
            if pool is None or not _is_max_pool(pool) or not _stateless(pool):
                continue
            before = seq._modules[prev]
            spot = (seq, prev) if before is not None and not isinstance(before, torch.nn.Sequential) else None
            if spot is None and before is not None:
                spot = _tail(before)
            if spot is None:
                continue
            holder, name = spot
            act = holder._modules[name]
            if act is None or not is_monotone(act) or not _stateless(act):
                continue
            holder._modules[name], seq._modules[cur] = pool, act
            if holder is not seq:
                pool_before_activation(holder)  # keep moving inside the nested container
            swaps += 1
            changed = True
            break
    return swaps


def _is_channel_affine(module: torch.nn.Module) -> bool:
    """Per-channel affine maps with one sign per channel: they leave correlations unchanged."""
    from dualflow.nn.structure import Identity

    return isinstance(module, BatchNorm2d | Identity)


def window_plan(modules: list[torch.nn.Module]) -> dict[int, int]:
    """``{i: j}`` for every :class:`~dualflow.nn.Conv2d` at position ``i`` whose output reaches the
    :class:`~dualflow.nn.MaxPool2d` at position ``j`` through per-channel affine modules
    only (BatchNorm, Identity), where the pool uses window correlations."""
    plan: dict[int, int] = {}
    for j, pool in enumerate(modules):
        if not isinstance(pool, MaxPool2d) or not pool.wants_correlation:
            continue
        i = j - 1
        while i >= 0 and _is_channel_affine(modules[i]):
            i -= 1
        if i >= 0 and isinstance(modules[i], Conv2d):
            plan[i] = j
    return plan
