"""How callers plug into the loop: callbacks (epoch-end evaluation and logging, step hooks,
early stop) and the distributed-data-parallel hooks (:class:`Parallel`).

The library knows nothing about process groups: a caller that runs several processes
(``dualflow.experiments.distributed.parallel``) hands :func:`~dualflow.train.fit` a
:class:`Parallel` whose functions wrap the objective in DDP and reduce across processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dualflow.train.config import History

__all__ = ["Callback", "EvalCallback", "LoopState", "Parallel", "StopAfter"]


def _identity(x: Any) -> Any:
    return x


def _gather_one(x: Any) -> list[Any]:
    return [x]


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Parallel:
    """Distributed data parallel, supplied by the caller (default: one process, all no-ops).

    Every process runs :func:`~dualflow.train.fit` on its own shard of each epoch (the data
    source shards: e.g. a loader with ``num_replicas``/``rank``); ``fit`` then:

    * trains ``wrap(objective)`` (e.g. ``DistributedDataParallel``, which averages the
      gradients of the per-process mean losses);
    * sums the epoch's running sums over processes with ``all_reduce_sum`` (so records
      count every example once);
    * checkpoints from rank 0 only, with every process's RNG state and running sums
      (``all_gather``), and on resume reads the file on rank 0 and ``broadcast`` s it;
    * shows progress on rank 0 only.

    Attributes:
        rank, world_size: this process and the number of processes.
        wrap: ``module -> module`` to train (DDP).
        all_reduce_sum: in-place sum of a tensor over processes (returns it).
        all_gather: ``obj -> [obj of rank 0, ...]``.
        broadcast: ``obj -> rank 0's obj``.
        barrier: wait for every process.
    """

    rank: int = 0
    world_size: int = 1
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = _identity
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _identity
    all_gather: Callable[[Any], list[Any]] = _gather_one
    broadcast: Callable[[Any], Any] = _identity
    barrier: Callable[[], None] = _nothing

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@dataclass
class LoopState:
    """The loop's position, as callbacks see it.

    Attributes:
        model: the module being trained.
        history: the finished epochs.
        epoch: current epoch (0-based).
        step: steps finished in the current epoch.
        steps_per_epoch: mini-batches per epoch (per process).
        epochs: epochs of the run.
        resumed_from: ``(epoch, step)`` of the checkpoint this run resumed from, or ``None``.
    """

    model: torch.nn.Module
    history: History
    epoch: int
    step: int
    steps_per_epoch: int
    epochs: int
    resumed_from: tuple[int, int] | None = None
    stop_requested: bool = field(default=False, repr=False)

    @property
    def global_step(self) -> int:
        """Optimizer steps done in total (before a resume included)."""
        return self.epoch * self.steps_per_epoch + self.step

    def request_stop(self) -> None:
        """Stop at the next safe point: after this step (mid-epoch, leaving a checkpoint at
        the position as an interrupted run would) or, on the epoch's last step, after the
        epoch's end (evaluation, record, checkpoint)."""
        self.stop_requested = True


class Callback:
    """Hooks of the loop; override what you need. ``on_epoch_end`` may add keys to
    ``record`` before it joins the history and the checkpoint."""

    def on_train_start(self, state: LoopState) -> None:
        """Before the first step (after a resume has been loaded)."""

    def on_step_end(self, state: LoopState) -> None:
        """After every optimizer step (``state.step`` already counts it)."""

    def on_epoch_end(self, state: LoopState, record: dict[str, Any]) -> None:
        """After an epoch's last step, with the epoch's record."""


class EvalCallback(Callback):
    """Runs ``eval_fn(model)`` at every epoch end in eval mode without gradients and adds
    its values (as floats) to the record."""

    def __init__(self, eval_fn: Callable[[torch.nn.Module], dict[str, float]]) -> None:
        self.eval_fn = eval_fn

    def on_epoch_end(self, state: LoopState, record: dict[str, Any]) -> None:
        was = state.model.training
        state.model.eval()
        try:
            with torch.no_grad():
                record.update({k: float(v) for k, v in self.eval_fn(state.model).items()})
        finally:
            state.model.train(was)


class StopAfter(Callback):
    """Stop once ``steps`` optimizer steps (resumed ones included) are done, leaving a
    checkpoint as a killed run would (for testing a resume, or a time budget in steps)."""

    def __init__(self, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = int(steps)

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step >= self.steps:
            state.request_stop()
