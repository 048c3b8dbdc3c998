"""The settings of the loop (:class:`TrainConfig`) and what it returns (:class:`History`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, overload

__all__ = ["History", "TrainConfig"]


@dataclass
class TrainConfig:
    """Settings of :func:`dualflow.train.fit`.

    Attributes:
        epochs: passes over the training data.
        batch_size: mini-batch size ``B`` (tensor and ``Dataset`` data; a loader brings its own).
        lr: learning rate of the built-in optimizers.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (ignored when ``fit`` gets an optimizer factory).
        weight_decay: L2 factor of the built-in optimizers. It acts on point parameters only
            when :func:`~dualflow.train.make_optimizer` knows the model: the Gaussian weights
            ``(mu, rho)`` are regularised by the KL (decaying ``rho`` would pull every ``sigma``
            towards ``softplus(0)``).
        momentum, nesterov: SGD settings.
        schedule: ``"cosine"`` (annealed per step to 0) or ``"constant"``.
        kl_weight: factor of ``KL(q||p)``; ``None`` means ``1/N`` (Eq. 2).
        seed: seeds the training randomness: the data order and, through
            :func:`~dualflow.train.loop.stream_seed`, the global generators (weight noise,
            augmentation); the caller's global RNG states are restored when ``fit`` returns.
        checkpoint: path of a checkpoint file; if it exists (and ``resume``), training resumes from it.
        resume: continue from an existing ``checkpoint`` (``False``: start over, overwrite it).
        checkpoint_every: also save every this many steps (always at every epoch end).
        progress: show a progress bar (steps of all epochs; on rank 0 only).
        grad_clip: clip the gradient norm (``None``: no clipping).
        drop_last: drop the last incomplete batch.
        amp: bf16 autocast of the forward's matrix products and convolutions; moment rules,
            loss and KL stay float32 (:func:`dualflow.train.mixed_precision`).
        threads: torch CPU threads while ``fit`` runs (restored on exit). ``None`` keeps
            torch's setting and warns once when it exceeds the idle cores
            (:func:`dualflow.train.check_threads`).
        check_every: the loss is checked for NaN/inf every this many steps (and at every
            epoch end and checkpoint); between checks the loop never waits for the device.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "cosine"
    kl_weight: float | None = None
    seed: int = 0
    checkpoint: str | None = None
    resume: bool = True
    checkpoint_every: int = 0
    progress: bool = True
    grad_clip: float | None = None
    drop_last: bool = False
    amp: bool = False
    threads: int | None = None
    check_every: int = 50

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.kl_weight is not None and not self.kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.check_every < 1 or self.checkpoint_every < 0:
            raise ValueError("check_every must be >= 1 and checkpoint_every >= 0")


@dataclass
class History:
    """Per-epoch records of :func:`dualflow.train.fit`.

    Every record holds ``epoch`` (1-based), ``loss`` (the objective ``mean J + kl_weight KL``),
    ``nll`` (mean ``J``), ``kl``, ``lr``, ``seconds`` (training time of the epoch), the
    means of ``fit``'s ``metrics`` and what ``eval_fn`` / callbacks added.

    Indexing: ``history[-1]`` (an int) is the last epoch's record (a dict);
    ``history["loss"]`` (a str) is that key over the epochs that have it (a list); a key no
    epoch has raises ``KeyError``.

    Attributes:
        epochs: the records.
        steps: optimizer steps done, those before a resume included.
        stopped: ``True`` when a callback stopped the run early (a checkpoint holds the position).
        resumed_from: ``(epoch, step)`` the run resumed from, or ``None``.
    """

    epochs: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    stopped: bool = False
    resumed_from: tuple[int, int] | None = None

    @overload
    def __getitem__(self, key: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, key: str) -> list[Any]: ...

    def __getitem__(self, key: int | str) -> dict[str, Any] | list[Any]:
        if isinstance(key, str):
            values = [e[key] for e in self.epochs if key in e]
            if not values and self.epochs:
                known = sorted({k for e in self.epochs for k in e})
                raise KeyError(f"no epoch record has {key!r}; keys: {', '.join(known)}")
            return values
        if isinstance(key, int):
            return self.epochs[key]
        raise TypeError(f"History index must be an int (epoch) or a str (key), got {type(key).__name__}")

    def __len__(self) -> int:
        return len(self.epochs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.epochs)
