"""The classify runner: data, method and augmentation handed to the one training loop
(:meth:`dualflow.methods.Method.fit`), then the test evaluation and the record."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from dualflow import methods, models, train
from dualflow.experiments import distributed as ddist
from dualflow.experiments import metrics as M
from dualflow.experiments.augment import MixAugment, train_transform
from dualflow.experiments.classify.config import ClassifyConfig, Resolved, resolve
from dualflow.experiments.classify.report import dataset_label, make_record, plot_history
from dualflow.experiments.data.images import BatchLoader, ImageData, load_dataset
from dualflow.gaussian import Gaussian

__all__ = ["evaluate", "train_and_evaluate"]

#: Settings that may change between an interrupted run and its resumption.
_VOLATILE = (
    "data_dir",
    "device",
    "threads",
    "stop_after_steps",
    "checkpoint_every",
    "eval_batch_size",
    "amp",
)


def train_and_evaluate(
    config: ClassifyConfig,
    workdir: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    log: Callable[[str], None] | None = print,
    command: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate one configuration; return its record (and write it to ``out``,
    with the learning curves beside it as ``.png``, from rank 0).

    ``workdir`` holds ``checkpoint.pt`` (``None``: no checkpoints); ``resume`` continues from
    it (the configuration must match, apart from device/threads/AMP/paths), else it is
    overwritten. ``log`` gets the per-epoch lines (rank 0; ``None``: silent, no progress
    bars). The record holds ``test_error`` (a fraction), ``test_nll``, ``test_ece``,
    ``test_brier``, the resolved settings, the history and timings; ``{"interrupted": True,
    ...}`` when ``stop_after_steps`` ended the run early. The thread count and TF32 are set
    for the run only.
    """
    t_start = time.perf_counter()
    cfg = config
    cfg.validate()
    info = ddist.setup(cfg.device)
    say = log if (log is not None and info.is_main) else None
    ckpt = Path(workdir) / "checkpoint.pt" if workdir is not None else None
    with ExitStack() as modes:
        modes.enter_context(train.num_threads(cfg.threads))
        if info.device.type == "cuda":  # fp32 storage, TF32 products (see the package doc)
            modes.enter_context(train.tf32(True, cudnn_benchmark=True))
        data, val, r, method = _prepare(cfg, info)
        xs, ys = data.x_train, data.y_train
        if info.device.type == "cuda":
            xs, ys = xs.to(info.device), ys.to(info.device)
        loader = BatchLoader(
            xs,
            ys,
            cfg.batch_size,
            seed=cfg.seed,
            device=info.device,
            num_replicas=info.world_size,
            rank=info.rank,
        )
        if say is not None:
            say(_banner(cfg, r, data, len(loader), info))
        evaluation = {"samples": cfg.samples, "batch_size": cfg.eval_batch_size, "amp": cfg.amp}
        evaluation["progress"] = say is not None

        def validate(m: methods.Method) -> dict[str, float]:
            t0 = time.perf_counter()
            v = evaluate(m, val[0], val[1], data.normalize, info=info, desc="validation", **evaluation)
            return {
                "val_loss": v["nll"],
                "val_error": v["error"],
                "val_ece": v["ece"],
                "val_brier": v["brier"],
                "val_seconds": time.perf_counter() - t0,
            }

        callbacks: list[train.Callback] = [_Log(say, cfg.epochs, ckpt)] if say is not None else []
        if cfg.stop_after_steps is not None:
            callbacks.append(train.StopAfter(cfg.stop_after_steps))
        hist = method.fit(
            loader,
            _train_config(cfg, r, ckpt, resume, progress=say is not None),
            validate if val is not None else None,
            data_size=r.ng_data_size or int(data.y_train.shape[0]),
            transform=_augmentation(cfg, r, data),
            metrics=_train_errors,
            callbacks=callbacks,
            parallel=ddist.parallel(info),
            meta={k: v for k, v in asdict(cfg).items() if k not in _VOLATILE},
        )
        if hist.stopped:
            epoch = hist.steps // len(loader)
            return {"interrupted": True, "global_step": hist.steps, "epoch": epoch, "checkpoint": str(ckpt)}
        t_test = time.perf_counter()
        with train.seeded(cfg.seed + 7919 * info.rank + 1):  # sampled predictives: same draws after a resume
            test = evaluate(method, data.x_test, data.y_test, data.normalize, info=info, **evaluation)
        t_test = time.perf_counter() - t_test
    record = make_record(cfg, r, data, info, method, hist, test, command)
    record.update(seconds=time.perf_counter() - t_start, test_eval_seconds=t_test)
    if say is not None:
        say(
            f"test: error {test['error']:.4f}  nll {test['nll']:.4f}  ece {test['ece']:.4f}  "
            f"brier {test['brier']:.4f}  ({record['seconds']:.0f}s)"
        )
    if out is not None and info.is_main:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record, indent=1) + "\n")
        plot_history(record, Path(out).with_suffix(".png"))
    ddist.barrier()
    return record


# ============================================================================ the parts


def _prepare(
    cfg: ClassifyConfig, info: ddist.DistInfo
) -> tuple[ImageData, tuple[Tensor, Tensor] | None, Resolved, methods.Method]:
    """Data (and the validation split), resolved settings and the method (initialised by
    ``cfg.seed``, the same on every rank)."""
    data = load_dataset(cfg.dataset, cfg.data_dir).limit_train(cfg.limit_train)
    val = None
    if cfg.val:
        if cfg.val >= data.y_train.shape[0]:
            raise ValueError(
                f"val ({cfg.val}) must be smaller than the training set ({data.y_train.shape[0]})"
            )
        data, val = data.split_validation(cfg.val)
    r = resolve(cfg, int(data.y_train.shape[0]))
    build = models.builder(
        cfg.arch,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        normalization=r.normalization,
        init_var_ratio=cfg.init_var_ratio,
        prior_var=cfg.prior_var,
        **cfg.arch_options,
    )
    opts = {
        k: v for k, v in {"train_samples": cfg.train_samples, "ng_lr": cfg.ng_lr}.items() if v is not None
    }
    with train.seeded(cfg.seed):
        method = methods.create(cfg.method, build, task="classification", samples=cfg.samples, **opts)
    return data, val, r, method.to(info.device)


def _train_config(
    cfg: ClassifyConfig, r: Resolved, ckpt: Path | None, resume: bool, progress: bool
) -> train.TrainConfig:
    return train.TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=r.lr,
        optimizer="sgd" if r.optimizer == "sgd" else "adam",  # "ng+adam": the method's own optimizer
        weight_decay=r.weight_decay,  # point parameters only (make_optimizer knows the method)
        momentum=cfg.momentum,
        nesterov=True,
        kl_weight=r.kl_weight_abs,
        seed=cfg.seed,
        checkpoint=str(ckpt) if ckpt is not None else None,
        resume=resume,
        checkpoint_every=cfg.checkpoint_every,
        progress=progress,
        amp=cfg.amp,
    )


def _augmentation(cfg: ClassifyConfig, r: Resolved, data: ImageData) -> Callable[[Tensor, Tensor], Any]:
    """The batch transform: uint8 -> normalised float with crop/flip/RandAugment, then
    mixup/cutmix (targets :class:`dualflow.train.MixedTargets`)."""
    aug = train_transform(
        data.mean,
        data.std,
        crop_padding=4 if "crop-flip" in r.augment else 0,
        flip="crop-flip" in r.augment,
        randaugment_nm=(2, 9) if "randaugment" in r.augment else None,
    )
    mix = MixAugment(
        mixup_alpha=cfg.mixup_alpha if "mixup" in r.augment else 0.0,
        cutmix_alpha=cfg.cutmix_alpha if "cutmix" in r.augment else 0.0,
    )

    def transform(xb: Tensor, yb: Tensor) -> tuple[Tensor, Any]:
        x = aug(xb)
        return mix(x, yb) if mix.active else (x, yb)

    return transform


def _train_errors(outputs: Any, targets: Any) -> dict[str, Tensor]:
    """Wrong labels of the first training pass (a mixed example counts for its larger part)."""
    first = outputs[0][0]
    logits = first.mean if isinstance(first, Gaussian) else first
    if isinstance(targets, train.MixedTargets):
        targets = targets.y_a if targets.lam >= 0.5 else targets.y_b
    return {"error": (logits.argmax(1) != targets).sum()}


class _Log(train.Callback):
    """Per-epoch lines (and a line on resuming), written around the progress bars."""

    def __init__(self, say: Callable[[str], None], epochs: int, where: Path | None) -> None:
        self.say, self.epochs, self.where = say, epochs, where

    def on_train_start(self, state: train.LoopState) -> None:
        if state.resumed_from is not None:
            self.say(
                f"resumed from {self.where} at epoch {state.resumed_from[0]}, step {state.resumed_from[1]}"
            )

    def on_epoch_end(self, state: train.LoopState, r: dict[str, Any]) -> None:
        val = f"  val loss {r['val_loss']:.4f} err {r['val_error']:.4f}" if "val_loss" in r else ""
        with tqdm.external_write_mode():
            self.say(
                f"epoch {r['epoch']:>3}/{self.epochs}  train loss {r['loss']:.4f} (nll {r['nll']:.4f}"
                f" + kl {r['loss'] - r['nll']:.4f}) err {r['error']:.4f}{val}  [{r['seconds']:.0f}s]"
            )


@torch.no_grad()
def evaluate(
    method: methods.Method,
    x: Tensor,
    y: Tensor,
    normalize: Callable[[Tensor], Tensor],
    *,
    info: ddist.DistInfo | None = None,
    samples: int = 16,
    batch_size: int = 500,
    amp: bool = False,
    progress: bool = False,
    desc: str = "test",
) -> dict[str, float]:
    """Error, NLL, ECE (15 bins) and Brier of ``method.predict`` on uint8 images ``x`` with
    labels ``y`` (a progress bar with ``progress``); with several processes each evaluates
    every ``world_size``-th image and the sums are added up, so every image counts once."""
    info = info or ddist.DistInfo(device=next(method.parameters()).device)
    dev = info.device
    idx = torch.arange(info.rank, int(y.shape[0]), info.world_size)
    sums = torch.zeros(4 + 3 * M.ECE_BINS, dtype=torch.float64, device=dev)
    starts = range(0, idx.shape[0], batch_size)
    with train.mixed_precision(method, dev, amp):
        for i in tqdm(starts, desc=desc, unit="batch", leave=False, disable=not progress):
            j = idx[i : i + batch_size]
            p = method.predict(normalize(x[j.to(x.device)].to(dev)), samples=samples, batch_size=len(j))
            sums += M.metric_sums(p.float(), y[j.to(y.device)].to(dev))
    return M.finalize(ddist.all_reduce_sum(sums))


def _banner(cfg: ClassifyConfig, r: Resolved, data: ImageData, steps: int, info: ddist.DistInfo) -> str:
    val = f", {cfg.val} val" if cfg.val else ""
    where = (
        f"{info.device}{f' x{info.world_size}' if info.enabled else ''}{', bf16 autocast' if cfg.amp else ''}"
    )
    return (
        f"{dataset_label(data)}: {cfg.arch} ({r.normalization}) / {cfg.method}, "
        f"{data.y_train.shape[0]} train{val}, "
        f"{steps} steps/epoch x {cfg.epochs} epochs, {r.optimizer} lr {r.lr:g}, kl_weight {cfg.kl_weight:g}, "
        f"augment {','.join(r.augment) or 'none'}, {where}"
    )
