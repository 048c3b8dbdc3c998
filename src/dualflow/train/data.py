"""Where the loop's mini-batches come from, in an order that is a function of ``(seed, epoch)``.

Three kinds of training data (:func:`batch_source`):

* ``(inputs, targets)`` tensors (inputs may be a :class:`~dualflow.Gaussian`): epoch ``e``
  is ``randperm(N)`` from a generator seeded with ``seed * 1_000_003 + e``;
* a ``torch.utils.data.Dataset``: the same order as ``DataLoader(shuffle=True)`` with that
  generator; batches before a resume position are never fetched, so random transforms
  inside the dataset draw exactly what an uninterrupted run draws;
* a loader: any object with ``__len__`` (batches per epoch) and ``__iter__`` (one epoch of
  ``(x, y)`` batches), and ``set_epoch(e)`` when its order depends on the epoch (e.g.
  :class:`dualflow.experiments.data.BatchLoader`, which also shards for distributed runs).
  On a resume the first batches of the epoch are drawn and dropped, so its batches must
  not consume global random numbers (put random augmentation into ``fit``'s ``transform``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from dualflow.gaussian import Gaussian

__all__ = ["BatchSource", "batch_source", "data_size"]


def _validate_pair(data: tuple[Any, ...]) -> None:
    if len(data) != 2:
        raise ValueError("train data must be a pair (inputs, targets)")
    x, y = data
    xm = x.mean if isinstance(x, Gaussian) else x
    if not isinstance(xm, Tensor) or not isinstance(y, Tensor):
        raise TypeError("train data must be a pair of tensors (inputs, targets)")
    if xm.shape[0] != y.shape[0]:
        raise ValueError(f"inputs and targets differ in length: {xm.shape[0]} vs {y.shape[0]}")
    if xm.shape[0] == 0:
        raise ValueError("train data is empty")
    if not bool(torch.isfinite(xm).all()):
        raise ValueError("train inputs contain NaN or inf values")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise ValueError("train targets contain NaN or inf values")


def data_size(data: Any) -> int | None:
    """Number of training examples ``N`` (``None`` for a loader without ``num_examples``)."""
    if isinstance(data, tuple):
        return int(data[1].shape[0])
    if isinstance(data, torch.utils.data.Dataset):
        return len(data)  # type: ignore[arg-type]
    n = getattr(data, "num_examples", None)
    return int(n) if n is not None else None


class BatchSource:
    """``num_batches`` per epoch and ``epoch(e, start)``: the batches ``start, start + 1, ...``
    of epoch ``e`` on ``device``. ``full`` is the one full batch ``(x, y)`` of tensor data that
    fits in one (its order does not matter), else ``None``."""

    def __init__(self, data: Any, batch_size: int, seed: int, drop_last: bool, device: torch.device) -> None:
        self.data, self.device = data, device
        self.batch_size, self.seed, self.drop_last = int(batch_size), int(seed), bool(drop_last)
        if isinstance(data, tuple):
            _validate_pair(data)
            n = int(data[1].shape[0])
            self.num_batches = n // batch_size if drop_last else math.ceil(n / batch_size)
        elif isinstance(data, torch.utils.data.Dataset):
            n = len(data)  # type: ignore[arg-type]
            if n == 0:
                raise ValueError("train data is empty")
            self.num_batches = n // batch_size if drop_last else math.ceil(n / batch_size)
        elif hasattr(data, "__iter__") and hasattr(data, "__len__"):
            self.num_batches = len(data)
        else:
            raise TypeError(
                "train data must be a (inputs, targets) tuple of tensors, a torch Dataset, or a loader "
                "(an iterable of (x, y) batches with __len__)"
            )
        self.full = None
        if isinstance(data, tuple) and self.num_batches == 1 and int(data[1].shape[0]) <= self.batch_size:
            self.full = (data[0].to(device), data[1].to(device))  # moved once, not every epoch
        if self.num_batches < 1:
            raise ValueError(
                "train data gives no batch per epoch (fewer examples than batch_size with drop_last)"
            )

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, Any]]:
        data, dev, bs = self.data, self.device, self.batch_size
        if self.full is not None:
            # one full batch: its mean loss does not depend on the order, so skip the shuffle
            if start == 0:
                yield self.full
        elif isinstance(data, tuple):
            x, y = data
            perm = torch.randperm(int(y.shape[0]), generator=self._generator(epoch))
            for b in range(start, self.num_batches):
                idx = perm[b * bs : (b + 1) * bs]
                xb = x.at(idx) if isinstance(x, Gaussian) else x[idx]
                yield xb.to(dev), y[idx].to(dev)
        elif isinstance(data, torch.utils.data.Dataset):
            g = self._generator(epoch)
            sampler = torch.utils.data.RandomSampler(data, generator=g)
            idx = list(torch.utils.data.BatchSampler(sampler, bs, self.drop_last))
            # its own generator: the loader's base seed must not draw from the global RNG
            loader = torch.utils.data.DataLoader(data, batch_sampler=idx[start:], generator=g)
            for xb, yb in loader:
                yield xb.to(dev), yb.to(dev)
        else:
            if hasattr(data, "set_epoch"):
                data.set_epoch(epoch)
            for b, (xb, yb) in enumerate(data):
                if b >= start:
                    yield xb.to(dev), yb.to(dev)


def batch_source(data: Any, batch_size: int, seed: int, drop_last: bool, device: torch.device) -> BatchSource:
    """The :class:`BatchSource` of ``data`` (validated: shapes, emptiness, NaN/inf in tensors)."""
    return BatchSource(data, batch_size, seed, drop_last, device)
