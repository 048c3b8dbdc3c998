"""Numeric modes as context managers, each restored on exit: flush-to-zero of subnormal
floats, TF32 matrix products, the CPU thread count, bf16 mixed precision.

Thread policy of the library (warn, do not set): torch defaults to one intra-op thread per
core. On a machine whose cores are busy with other work, those threads compete and a small
model trains many times slower (a 10x slowdown was measured on a loaded 2-core machine).
:func:`dualflow.train.fit` therefore never changes the thread count on its own: with
``TrainConfig(threads=n)`` it runs with ``n`` threads and restores the previous count on
exit; with ``threads=None`` it calls :func:`check_threads`, which warns (once per distinct
situation) when torch's threads exceed the idle cores. Small models (UCI-sized MLPs) gain
nothing from several threads: use ``threads=1``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor

from dualflow.gaussian import Gaussian
from dualflow.nn.base import BayesLayer
from dualflow.nn.norm import _BatchNorm

__all__ = [
    "add_amp_hooks",
    "autocast",
    "check_threads",
    "denormals_flushed",
    "flush_denormal",
    "mixed_precision",
    "num_threads",
    "tf32",
]


# ----------------------------------------------------------------------------- subnormals


def denormals_flushed() -> bool:
    """Whether the CPU currently flushes subnormal floats to zero (probed, torch has no getter)."""
    return float(torch.full((1,), 1e-39, dtype=torch.float32) * 2.0) == 0.0


@contextmanager
def flush_denormal(enabled: bool = True) -> Iterator[None]:
    """Flush subnormal floats to zero inside the block (decaying Adam moments and the far
    tails of Gaussian rules produce them; they slow CPU matmuls 10-100x); the previous mode
    is restored on exit."""
    before = denormals_flushed()
    torch.set_flush_denormal(enabled)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


# ----------------------------------------------------------------------------- TF32


@contextmanager
def tf32(enabled: bool = True, cudnn_benchmark: bool | None = None) -> Iterator[None]:
    """TF32 matrix products and convolutions on CUDA (float32 storage, 10-bit mantissa
    products) inside the block; optionally ``cudnn.benchmark``. Everything is restored on exit."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark, torch.get_float32_matmul_precision())
    try:
        matmul.allow_tf32 = enabled
        cudnn.allow_tf32 = enabled
        if cudnn_benchmark is not None:
            cudnn.benchmark = cudnn_benchmark
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = saved[:3]
        torch.set_float32_matmul_precision(saved[3])


# ----------------------------------------------------------------------------- threads


def _idle_cores() -> tuple[int, float]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return cores, load


def check_threads(device: torch.device | str = "cpu") -> str | None:
    """Warn (``RuntimeWarning``) when torch's intra-op threads exceed the cores left idle by
    the machine's load (1-minute load average), which can slow CPU training 10x. Returns
    the warning text, or ``None`` when there is nothing to warn about (or ``device`` is not
    the CPU)."""
    if torch.device(device).type != "cpu":
        return None
    n = torch.get_num_threads()
    if n <= 1:
        return None
    cores, load = _idle_cores()
    idle = max(cores - load, 1.0)
    if n <= idle + 0.5:
        return None
    # the text names no load figure, so Python's warning filter shows it once per call site
    msg = (
        f"torch uses {n} CPU threads but fewer of the {cores} cores are idle; oversubscribed "
        "threads can make training many times slower. Pass TrainConfig(threads=1) (or call "
        "torch.set_num_threads) to choose the count."
    )
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return msg


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads and restore the previous count
    (``None``: leave the count alone)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- bf16 autocast


def _float_out(x: Any) -> Any:
    if isinstance(x, Gaussian):
        return Gaussian(x.mean.float(), x.var.float())
    return x.float() if isinstance(x, Tensor) and x.is_floating_point() else x


def _upcast_output(_mod: torch.nn.Module, _args: Any, out: Any) -> Any:
    return _float_out(out)


def _upcast_input(_mod: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_float_out(a) for a in args)


def add_amp_hooks(model: torch.nn.Module) -> list[Any]:
    """Keep everything but the layers' matmuls/convolutions in float32 under bf16 autocast:
    cast every :class:`~dualflow.nn.BayesLayer`'s output (mean and variance) back to float32
    and feed BatchNorm float32 (its running statistics are float32). Modules that already
    carry the hook are skipped. Returns the new hooks' handles (``handle.remove()`` undoes)."""
    handles = []
    for mod in model.modules():
        if isinstance(mod, BayesLayer):
            if not any(h is _upcast_output for h in mod._forward_hooks.values()):
                handles.append(mod.register_forward_hook(_upcast_output))
        elif isinstance(mod, _BatchNorm):
            if not any(h is _upcast_input for h in mod._forward_pre_hooks.values()):
                handles.append(mod.register_forward_pre_hook(_upcast_input))
    return handles


def autocast(device: torch.device | str, enabled: bool = True) -> Any:
    """``torch.autocast(device, dtype=bfloat16)`` when ``enabled``, else a no-op context."""
    dev = torch.device(device)
    return torch.autocast(dev.type, dtype=torch.bfloat16) if enabled else nullcontext()


@contextmanager
def amp_hooks(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """:func:`add_amp_hooks` for the duration of the block."""
    handles = add_amp_hooks(model) if enabled else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def mixed_precision(
    model: torch.nn.Module, device: torch.device | str, enabled: bool = True
) -> Iterator[None]:
    """bf16 mixed precision for ``model`` inside the block: autocast runs the matrix products
    and convolutions in bf16, while the hooks of :func:`add_amp_hooks` keep the elementwise
    moment rules (ReLU's ``Phi``, Clark's max, the probit softmax), residual sums, BatchNorm,
    the loss and the KL in float32. Why the variance maps may run in bf16: they are sums of
    non-negative products, so bf16 inputs with a float32 accumulator give a relative error of
    order 2^-8 without cancellation, and bf16 has float32's exponent range. float16 is not
    offered: weight variances of 1e-8 lie below its normal range. Hooks removed on exit."""
    with amp_hooks(model, enabled), autocast(device, enabled):
        yield
