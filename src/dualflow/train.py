"""A small reusable training loop for moment-propagating networks.

Minimises the paper's objective (Eq. 2) per mini-batch of size ``B`` from ``N`` examples:
``mean_batch J + kl_weight * KL(q || p)`` with ``kl_weight = 1/N`` by default.

Exact resumption: the data order of epoch ``e`` comes from a generator seeded with
``(seed, e)``, and a checkpoint stores model, loss, optimizer, scheduler, the position
``(epoch, step)`` and every RNG state, so a run interrupted (Ctrl-C, or killed after a
checkpoint) and resumed produces the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dualflow.gaussian import Gaussian, as_gaussian
from dualflow.nn.base import kl as model_kl

__all__ = ["History", "TrainConfig", "fit", "make_optimizer", "predict", "seed_everything"]


@dataclass
class TrainConfig:
    """Settings of :func:`fit`.

    Attributes:
        epochs: passes over the training data.
        batch_size: mini-batch size ``B``.
        lr: learning rate of the built-in optimizers.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (ignored when ``fit`` gets an optimizer factory).
        weight_decay, momentum, nesterov: optimizer settings.
        schedule: ``"cosine"`` (annealed per step to 0) or ``"constant"``.
        kl_weight: factor of ``KL(q||p)``; ``None`` means ``1/N`` (Eq. 2).
        seed: seeds initialisation-independent randomness: data order and sampling.
        checkpoint: path of a checkpoint file; if it exists, training resumes from it.
        checkpoint_every: save every this many steps (and at every epoch end).
        progress: show a progress bar.
        grad_clip: clip the gradient norm (``None``: no clipping).
        drop_last: drop the last incomplete batch.
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
    checkpoint_every: int = 0
    progress: bool = True
    grad_clip: float | None = None
    drop_last: bool = False

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


@dataclass
class History:
    """Per-epoch records: ``epoch``, ``loss`` (objective), ``nll`` (mean J), ``kl``, ``lr``,
    ``seconds`` and whatever ``eval_fn`` returned."""

    epochs: list[dict[str, float]] = field(default_factory=list)

    def __getitem__(self, key: str) -> list[float]:
        return [e[key] for e in self.epochs if key in e]

    def __len__(self) -> int:
        return len(self.epochs)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_atomic(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _batches(
    data: Any, batch_size: int, seed: int, epoch: int, drop_last: bool, device: torch.device, skip: int = 0
) -> tuple[int, Iterator[tuple[Any, Tensor]]]:
    """``(number of batches, iterator)`` for epoch ``epoch`` in a fixed order given ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Tensor):
        x, y = data
        n = y.shape[0]
        perm = torch.randperm(n, generator=g)
        nb = n // batch_size if drop_last else math.ceil(n / batch_size)

        def it() -> Iterator[tuple[Any, Tensor]]:
            for b in range(skip, nb):
                idx = perm[b * batch_size : (b + 1) * batch_size]
                xb = x.at(idx) if isinstance(x, Gaussian) else x[idx]
                yield xb.to(device), y[idx].to(device)

        return nb, it()
    if isinstance(data, torch.utils.data.Dataset):
        # the same order as DataLoader(shuffle=True, generator=g); batches done before an
        # interruption are never fetched, so a random transform cannot consume the RNG
        sampler = torch.utils.data.RandomSampler(data, generator=g)
        idx = list(torch.utils.data.BatchSampler(sampler, batch_size, drop_last))
        # its own generator: the loader's base seed must not draw from the global RNG
        loader = torch.utils.data.DataLoader(data, batch_sampler=idx[skip:], generator=g)
        return len(idx), ((xb.to(device), yb.to(device)) for xb, yb in loader)
    raise TypeError("train data must be a (inputs, targets) tuple of tensors or a torch Dataset")


def _data_size(data: Any) -> int:
    if isinstance(data, tuple):
        return int(data[1].shape[0])
    return len(data)


def _validate_data(data: Any) -> None:
    if isinstance(data, tuple):
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


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer :func:`fit` builds from ``cfg`` (``adam``, ``adamw`` or ``sgd``)."""
    # the fused Adam kernel is ~5x faster than the per-tensor loop on CPU (and exists on CUDA)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )


def fit(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    train_data: tuple[Tensor | Gaussian, Tensor] | torch.utils.data.Dataset,
    config: TrainConfig | None = None,
    *,
    optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
    scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None,
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    step_fn: Callable[[torch.nn.Module, Any, Tensor], Tensor] | None = None,
    device: str | torch.device | None = None,
) -> History:
    """Train ``model`` on ``train_data``, minimising ``mean J + kl_weight KL(q||p)``.

    Args:
        model: a ``dualflow.nn`` network (or any module; KL is 0 without Bayesian layers).
        loss_fn: ``loss_fn(output, targets) -> mean J``; may be a module with parameters
            (e.g. :class:`dualflow.losses.GaussianLikelihood`), which are trained too.
        train_data: ``(inputs, targets)`` tensors, or a ``torch.utils.data.Dataset``.
        config: :class:`TrainConfig`.
        optimizer: factory ``params -> Optimizer`` replacing the built-in choice.
        scheduler: factory ``(optimizer, total_steps) -> LR scheduler`` stepped every batch;
            the default follows ``config.schedule``.
        eval_fn: called at every epoch end in eval mode (no grad); its dict joins the history.
        step_fn: ``step_fn(model, x, y) -> mean J`` replacing ``loss_fn(model(x), y)``
            (for methods that need several forward passes per batch).
        device: where to train (default: the model's device).

    Returns:
        :class:`History` of per-epoch records.
    """
    from tqdm import tqdm

    cfg = config or TrainConfig()
    _validate_data(train_data)
    n = _data_size(train_data)
    kl_weight = 1.0 / n if cfg.kl_weight is None else cfg.kl_weight
    p0 = next(model.parameters(), None)
    dev = (
        torch.device(device) if device is not None else (p0.device if p0 is not None else torch.device("cpu"))
    )
    model.to(dev)
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn.to(dev)
    params = list(model.parameters())
    if isinstance(loss_fn, torch.nn.Module):
        params += [p for p in loss_fn.parameters() if all(p is not q for q in params)]
    opt = optimizer(params) if optimizer is not None else make_optimizer(params, cfg)
    steps_per_epoch = _batches(train_data, cfg.batch_size, cfg.seed, 0, cfg.drop_last, dev)[0]
    total = max(1, steps_per_epoch * cfg.epochs)
    if scheduler is not None:
        sched = scheduler(opt, total)
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    else:
        sched = None

    # Subnormal floats (decaying Adam moments, far tails of Gaussian rules) slow CPU
    # matmuls 10-100x; flush them to zero while training (restored on exit).
    flushed = torch.set_flush_denormal(True)

    history = History()
    start_epoch, start_step = 0, 0
    acc = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "count": 0, "seconds": 0.0}
    if cfg.checkpoint and os.path.exists(cfg.checkpoint):
        ck = torch.load(cfg.checkpoint, map_location=dev, weights_only=False)
        model.load_state_dict(ck["model"])
        if isinstance(loss_fn, torch.nn.Module):
            loss_fn.load_state_dict(ck["loss"])
        opt.load_state_dict(ck["optimizer"])
        if sched is not None and ck.get("scheduler") is not None:
            sched.load_state_dict(ck["scheduler"])
        history = History(ck["history"])
        start_epoch, start_step, acc = ck["epoch"], ck["step"], ck["acc"]
        _set_rng_state(ck["rng"])
    else:
        seed_everything(cfg.seed)

    def save(epoch: int, step: int, rng: dict[str, Any] | None = None) -> None:
        if not cfg.checkpoint:
            return
        _save_atomic(
            {
                "model": model.state_dict(),
                "loss": loss_fn.state_dict() if isinstance(loss_fn, torch.nn.Module) else None,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None,
                "history": history.epochs,
                "epoch": epoch,
                "step": step,
                "acc": dict(acc),
                "rng": rng if rng is not None else _rng_state(),
                "config": asdict(cfg),
            },
            cfg.checkpoint,
        )

    bar = tqdm(
        total=total,
        initial=start_epoch * steps_per_epoch + start_step,
        disable=not cfg.progress,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        leave=False,
    )
    # position after the last completed step, with the RNG state at that moment
    epoch, done, rng_done = start_epoch, start_step, _rng_state() if cfg.checkpoint else None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            done = start_step
            nb, batches = _batches(
                train_data, cfg.batch_size, cfg.seed, epoch, cfg.drop_last, dev, start_step
            )
            t0 = time.perf_counter()
            for step, (xb, yb) in enumerate(batches, start=start_step):
                opt.zero_grad(set_to_none=True)
                nll = step_fn(model, xb, yb) if step_fn is not None else loss_fn(model(xb), yb)
                kl = model_kl(model)
                loss = nll + kl_weight * kl
                if not bool(torch.isfinite(loss)):
                    raise FloatingPointError(
                        f"non-finite loss at epoch {epoch}, step {step}: lower the learning rate"
                    )
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                if sched is not None:
                    sched.step()
                bs = int(yb.shape[0])
                acc["loss"] += float(loss.detach()) * bs
                acc["nll"] += float(nll.detach()) * bs
                acc["kl"] += float(kl.detach()) * bs
                acc["count"] += bs
                done = step + 1
                if cfg.checkpoint:
                    rng_done = _rng_state()
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4f}", refresh=False)
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < nb:
                    acc["seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    save(epoch, step + 1)
            acc["seconds"] += time.perf_counter() - t0
            c = max(acc["count"], 1)
            rec = {
                "epoch": epoch + 1,
                "loss": acc["loss"] / c,
                "nll": acc["nll"] / c,
                "kl": acc["kl"] / c,
                "lr": opt.param_groups[0]["lr"],
                "seconds": acc["seconds"],
            }
            if eval_fn is not None:
                model.eval()
                with torch.no_grad():
                    rec.update({k: float(v) for k, v in eval_fn(model).items()})
            history.epochs.append(rec)
            acc = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "count": 0, "seconds": 0.0}
            start_step = 0
            save(epoch + 1, 0)
    except KeyboardInterrupt:
        # keep what was computed: the next call with the same checkpoint resumes here
        save(epoch, done, rng_done)
        raise
    finally:
        bar.close()
        if flushed:
            torch.set_flush_denormal(False)
    model.eval()
    return history


@torch.no_grad()
def predict(model: torch.nn.Module, x: Tensor, batch_size: int = 1024) -> Gaussian:
    """Predictive moments of ``model`` on ``x`` in eval mode, in batches: a :class:`Gaussian`."""
    was = model.training
    model.eval()
    p0 = next(model.parameters(), None)
    dev = p0.device if p0 is not None else x.device
    outs = [as_gaussian(model(x[i : i + batch_size].to(dev))) for i in range(0, x.shape[0], batch_size)]
    model.train(was)
    return Gaussian(torch.cat([o.mean for o in outs]), torch.cat([o.var for o in outs]))
