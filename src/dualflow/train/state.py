"""What an exact resume needs: the RNG states (:class:`RNGState`) and the checkpoint
(:class:`Checkpoint`, saved atomically, loaded with one clear error).

Seeding is explicit and scoped: :func:`seeded` seeds Python, NumPy and torch (CPU and CUDA)
inside a ``with`` block and restores the caller's states on exit, so library code never
leaves the process-wide generators reseeded.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

__all__ = ["Checkpoint", "CheckpointError", "RNGState", "seed_everything", "seeded"]

#: version of the checkpoint layout; a file of another version is refused with a clear error
FORMAT = 2


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) process-wide. Library code uses
    :func:`seeded` instead, which restores the previous states on exit."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if _accelerators():
        torch.manual_seed(seed)  # also (lazily) every accelerator's generator
    else:  # torch.manual_seed would queue lazy accelerator seeding, with a stack trace: ~2 ms
        torch.default_generator.manual_seed(seed)


def _accelerators() -> bool:
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return (
        torch.cuda.is_available()
        or bool(xpu is not None and xpu.is_available())
        or bool(mps is not None and mps.is_available())
    )


@dataclass
class RNGState:
    """The states of every global generator a training step may draw from: Python's
    ``random``, NumPy's legacy global generator, torch's CPU generator and (when CUDA is
    initialised) every CUDA device's."""

    python: Any
    numpy: Any
    torch: torch.Tensor
    cuda: list[torch.Tensor] | None = None

    @classmethod
    def capture(cls) -> RNGState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.cuda)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RNGState:
        return cls(**d)


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """``with seeded(s): ...`` runs the block with every global generator seeded by ``s``
    (``None``: unseeded, but still isolated) and restores the caller's states on exit."""
    saved = RNGState.capture()
    try:
        if seed is not None:
            seed_everything(seed)
        yield
    finally:
        saved.restore()


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, of another format, or written
    by another configuration. The message names the file."""


@dataclass
class Checkpoint:
    """Everything :func:`dualflow.train.fit` needs to continue exactly where it stopped.

    Attributes:
        model, loss, optimizer, scheduler: ``state_dict`` s (``loss``/``scheduler`` may be ``None``).
        history: the finished epochs' records.
        epoch, step: the position: the next step to run is ``step`` of epoch ``epoch`` (0-based).
        sums: per process, the running sums of the unfinished epoch (see ``fit``).
        rng: per process, the :class:`RNGState` as a dict, taken right after the last finished step.
        meta: the caller's description of the run; a resume with different ``meta`` is refused.
        config: the :class:`~dualflow.train.TrainConfig` as a dict (for reading; not compared).
    """

    model: dict[str, Any]
    loss: dict[str, Any] | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    history: list[dict[str, Any]]
    epoch: int
    step: int
    sums: list[dict[str, Any]]
    rng: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT

    @property
    def world_size(self) -> int:
        return len(self.rng)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: to ``path.tmp``, then rename, so a crash never leaves half a file."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        torch.save(asdict(self), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], map_location: Any = "cpu") -> Checkpoint:
        """Read a checkpoint; any problem raises one :class:`CheckpointError` naming the file."""
        path = os.fspath(path)
        hint = "delete it (or point to another checkpoint) to start over"
        try:
            # weights_only=False: the RNG states are NumPy/Python objects; only load your own files
            obj = torch.load(path, map_location=map_location, weights_only=False)
        except FileNotFoundError:
            raise
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path}: not a readable checkpoint (truncated or corrupt: {reason}); {hint}"
            ) from e
        names = {f.name for f in fields(cls)}
        if not isinstance(obj, dict) or obj.get("format") != FORMAT or not names <= set(obj):
            found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(
                f"{path}: not a dualflow training checkpoint of format {FORMAT} (found {found!r}); {hint}"
            )
        return cls(**{k: obj[k] for k in names})

    def check_compatible(self, path: str, meta: dict[str, Any], world_size: int) -> None:
        """Refuse a checkpoint of another run description or another number of processes."""
        diff = sorted(k for k in set(meta) | set(self.meta) if meta.get(k) != self.meta.get(k))
        if diff:
            raise CheckpointError(
                f"{path} was written by a different configuration (differs in: {', '.join(diff)}); "
                "use another checkpoint location or start over"
            )
        if self.world_size != world_size:
            raise CheckpointError(
                f"{path} was written by {self.world_size} process(es); resume with the same number "
                f"(got {world_size})"
            )
