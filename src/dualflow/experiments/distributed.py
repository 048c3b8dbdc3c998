"""Distributed data parallel helpers for the experiment runners (PyTorch's own DDP).

Launch several processes with ``torchrun`` (one per GPU, or several CPU processes)::

    torchrun --standalone --nproc_per_node=4 -m dualflow.experiments classify --dataset cifar10 ...
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
        --nproc_per_node=8 -m dualflow.experiments classify ...

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`setup` reads them and joins the process group by ``env://`` with
the ``nccl`` backend on CUDA and ``gloo`` on CPU. Without those variables (a plain run)
nothing is initialised and every helper is a no-op for one process.

What each rank does (see :mod:`dualflow.experiments.classify` and :func:`parallel`, the
hooks handed to the one training loop :func:`dualflow.train.fit`): it trains on its own shard
of every epoch's permutation (:class:`~dualflow.experiments.data.BatchLoader` with
``num_replicas``/``rank``), so the *global* batch is ``world_size x`` the per-process
``--batch-size``; DDP averages the gradients of the per-rank mean losses, which equals the
gradient of the mean over the global batch (equal shard sizes; tested); metrics are
summed over ranks (:func:`all_reduce_sum`); only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "env_world_size",
    "parallel",
    "resolve_device",
    "setup",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands.

    Attributes:
        rank, world_size, local_rank: as ``torchrun`` numbers them (0, 1, 0 for one process).
        device: the device this process computes on.
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (not distributed).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``"auto"``/``None``: ``cuda:<local_rank>`` when CUDA is available, else CPU;
    ``"cuda"``: the local rank's GPU (``ValueError`` without CUDA); ``"cpu"``: CPU."""
    name = (device or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available (this torch build or machine has no GPU)")
        if name == "cuda":
            return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def setup(device: str | None = "auto", *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group if launched by ``torchrun`` (``WORLD_SIZE > 1``).

    Uses ``init_method="env://"``, backend ``nccl`` for CUDA devices and ``gloo`` for CPU.
    Idempotent: a second call in the same process returns the same description.

    Returns:
        :class:`DistInfo` (rank, world size, local rank, device, backend).
    """
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistInfo(device=dev)
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        from datetime import timedelta

        tdist.init_process_group(
            backend=backend,
            init_method="env://",
            timeout=timedelta(seconds=timeout_s),
            **({"device_id": dev} if dev.type == "cuda" else {}),
        )
    return DistInfo(
        rank=tdist.get_rank(),
        world_size=tdist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        backend=tdist.get_backend(),
    )


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes, in place (and returned); identity for one process.

    On ``nccl`` the tensor must live on the GPU; on ``gloo`` anywhere (it is moved to the CPU
    and back when needed)."""
    if not _active():
        return t
    if tdist.get_backend() == "gloo" and t.device.type != "cpu":
        c = t.cpu()
        tdist.all_reduce(c, op=tdist.ReduceOp.SUM)
        t.copy_(c)
    else:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects); ``[obj]`` for one process."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for all processes (no-op for one)."""
    if _active():
        tdist.barrier()


def cleanup() -> None:
    """Leave the process group (if this process joined one)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def parallel(info: DistInfo) -> Any:
    """The :class:`dualflow.train.Parallel` hooks of this process for :func:`dualflow.train.fit`:
    ``DistributedDataParallel`` around the objective, sums/gathers/broadcasts over the process
    group. One process: the no-op default."""
    from dualflow.train import Parallel

    if not info.enabled:
        return Parallel()

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[info.device.index] if info.device.type == "cuda" else None)

    return Parallel(
        rank=info.rank,
        world_size=info.world_size,
        wrap=wrap,
        all_reduce_sum=all_reduce_sum,
        all_gather=all_gather_objects,
        broadcast=broadcast_object,
        barrier=barrier,
    )
