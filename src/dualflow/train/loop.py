"""The one training loop: :func:`fit`.

Minimises the paper's objective (Eq. 2) per mini-batch of size ``B`` from ``N`` examples,
``mean_batch J + kl_weight * KL(q || p)`` with ``kl_weight = 1/N`` by default, out of the
parts of this package: a batch source (:mod:`~dualflow.train.data`), the step's
:class:`~dualflow.train.Objective`, an optimizer and LR schedule, the checkpoint and RNG
state (:mod:`~dualflow.train.state`), callbacks and distributed hooks
(:mod:`~dualflow.train.hooks`), numeric modes (:mod:`~dualflow.train.numerics`).

Exact resumption: the data order of epoch ``e`` is a function of ``(seed, e)``; a
checkpoint stores model, loss, optimizer, scheduler, history, the position
``(epoch, step)``, the epoch's running sums and every process's RNG states, taken after the
last finished step. A run interrupted (Ctrl-C, a callback's stop, or killed after a
checkpoint) and resumed produces the same numbers as an uninterrupted one.

Lean steps: on an accelerator the running sums live on the device and the loss is checked
for NaN/inf every ``check_every`` steps, at epoch ends and before checkpoints, so an ordinary
step never waits for the device; on the CPU, where reading a scalar costs well under a
microsecond, every step is checked and a NaN names its step. Overhead over a hand-written
loop: ``benchmarks/bench_fit.py``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from dualflow.gaussian import Gaussian, as_gaussian
from dualflow.nn.base import BayesLayer
from dualflow.train.config import History, TrainConfig
from dualflow.train.data import batch_source, data_size
from dualflow.train.hooks import Callback, EvalCallback, LoopState, Parallel
from dualflow.train.numerics import amp_hooks, check_threads, flush_denormal, num_threads
from dualflow.train.objective import MixedTargets, Objective
from dualflow.train.state import Checkpoint, CheckpointError, RNGState, seed_everything, seeded

__all__ = ["fit", "make_optimizer", "predict", "stream_seed"]

OptimizerFactory = Callable[[list[Any]], torch.optim.Optimizer]


def _gaussian_param_ids(model: torch.nn.Module) -> set[int]:
    ids: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, BayesLayer) and mod.bayes:
            for mu, rho in mod.variational_pairs():
                ids.update((id(mu), id(rho)))
    return ids


def make_optimizer(
    params: Iterable[Any], cfg: TrainConfig, model: torch.nn.Module | None = None
) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names (``adam``, ``adamw`` or ``sgd`` with ``cfg.lr``, ...).

    Args:
        params: parameters, or parameter groups (dicts, which may set their own ``weight_decay``).
        cfg: the settings.
        model: when given, ``cfg.weight_decay`` acts on its point parameters only: the
            Gaussian weights ``(mu, rho)`` of its Bayesian layers get no decay (the KL is their
            regulariser; decay on ``rho`` would pull every ``sigma`` to ``softplus(0)``).
    """
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    if model is not None and cfg.weight_decay:
        gauss = _gaussian_param_ids(model)
        split = []
        for g in groups:
            ps = list(g["params"])
            split.append({**g, "params": [p for p in ps if id(p) in gauss], "weight_decay": 0.0})
            split.append({**g, "params": [p for p in ps if id(p) not in gauss]})
        groups = [g for g in split if g["params"]]
    flat = [p for g in groups for p in g["params"]]
    # the fused Adam kernel is ~5x faster than the per-tensor loop on CPU (and exists on CUDA)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in flat) or None
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )


def stream_seed(seed: int, rank: int = 0) -> int:
    """Seed of the global generators while :func:`fit` trains (weight noise, augmentation, the
    random transforms of a dataset): distinct per process, and distinct from ``seed`` itself
    (commonly the initialisation's seed: reusing it would replay the initial weights' normal
    draws as the first weight noise) and from the data-order generators ``seed * 1_000_003 + e``."""
    return seed * 1_000_003 + 500_009 + 7_919 * rank


def _device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p0 = next(model.parameters(), None)
    return p0.device if p0 is not None else torch.device("cpu")


def _to(module: torch.nn.Module, dev: torch.device) -> None:
    """``module.to(dev)`` unless everything is there already (``.to`` walks every module)."""
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.device != dev for t in tensors):
        module.to(dev)


class _Run:
    """One call of :func:`fit`: the state that a checkpoint holds, and the steps."""

    def __init__(
        self,
        cfg: TrainConfig,
        objective: Objective,
        runner: torch.nn.Module,
        opt: torch.optim.Optimizer,
        sched: Any,
        par: Parallel,
        meta: dict[str, Any],
        device: torch.device,
    ) -> None:
        self.cfg, self.objective, self.runner = cfg, objective, runner
        self.model = objective.model
        self.opt, self.sched, self.par, self.meta, self.device = opt, sched, par, meta, device
        self.history = History()
        self.sums = _Sums(device)

    def check_finite(self, epoch: int, step: int, since: int) -> None:
        if not self.sums.finite():
            where = f"step {step - 1}" if step - since == 1 else f"between steps {since} and {step}"
            raise FloatingPointError(
                f"non-finite loss at epoch {epoch + 1}, {where} (NaN or inf objective): "
                "lower the learning rate"
            )

    # ------------------------------------------------------------------ checkpoints
    def save(self, epoch: int, step: int, rng: RNGState | None = None) -> None:
        if not self.cfg.checkpoint:
            return
        rngs = self.par.all_gather((rng or RNGState.capture()).to_dict())
        sums = self.par.all_gather(self.sums.state())
        if self.par.is_main:
            loss_mod = self.objective.loss_module
            Checkpoint(
                model=self.model.state_dict(),
                loss=loss_mod.state_dict() if loss_mod is not None else None,
                optimizer=self.opt.state_dict(),
                scheduler=self.sched.state_dict() if self.sched is not None else None,
                history=self.history.epochs,
                epoch=epoch,
                step=step,
                sums=sums,
                rng=rngs,
                meta=self.meta,
                config=asdict(self.cfg),
            ).save(self.cfg.checkpoint)
        self.par.barrier()

    def resume(self) -> tuple[int, int] | None:
        """Load the checkpoint if there is one (read by rank 0, broadcast); its position."""
        path = self.cfg.checkpoint
        if not path or not self.cfg.resume:
            return None
        found: Any = None
        if self.par.is_main and os.path.exists(path):
            try:
                found = Checkpoint.load(path)
            except CheckpointError as e:
                found = e
        found = self.par.broadcast(found)
        if isinstance(found, CheckpointError):
            raise found
        if found is None:
            return None
        ck: Checkpoint = found
        ck.check_compatible(path, self.meta, self.par.world_size)
        try:
            self.model.load_state_dict(ck.model)
            loss_mod = self.objective.loss_module
            if loss_mod is not None and ck.loss is not None:
                loss_mod.load_state_dict(ck.loss)
            self.opt.load_state_dict(ck.optimizer)
            if self.sched is not None and ck.scheduler is not None:
                self.sched.load_state_dict(ck.scheduler)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path} does not fit this model/optimizer ({e}); start over") from e
        self.history.epochs = list(ck.history)
        self.sums.load(ck.sums[self.par.rank])
        RNGState.from_dict(ck.rng[self.par.rank]).restore()
        return ck.epoch, ck.step

    # ------------------------------------------------------------------ the epoch's record
    def record(self, epoch: int) -> dict[str, Any]:
        """The epoch's record from the running sums (summed over processes); raises on NaN/inf."""
        names, tot = self.sums.totals()
        if self.par.enabled:
            tot = self.par.all_reduce_sum(torch.tensor(tot, dtype=torch.float64, device=self.device)).tolist()
        if not (math.isfinite(tot[0]) and math.isfinite(tot[1])):
            raise FloatingPointError(
                f"non-finite loss in epoch {epoch + 1} (NaN or inf objective): lower the learning rate"
            )
        c = max(tot[2], 1.0)
        kw = self.objective.kl_weight
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": (tot[0] + kw * tot[1]) / c,
            "nll": tot[0] / c,
            "kl": tot[1] / c,
            "lr": self.opt.param_groups[0]["lr"],
            "seconds": self.sums.seconds,
        }
        if names:
            rec.update({k: v / c for k, v in zip(names, tot[3:])})
        return rec


def _host_sums(device: torch.device) -> bool:
    """Keep the running sums on the host (Python floats): on the CPU only."""
    return device.type == "cpu"


class _Sums:
    """The epoch's running sums: ``sum bs J``, ``sum bs KL``, examples, metric sums, seconds.

    On an accelerator they accumulate on the device, so a step never waits for it (NaN/inf is
    checked every ``check_every`` steps). On the CPU there is nothing to wait for -- reading a
    scalar costs well under a microsecond -- so they are Python floats and every step is checked.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.host = device, _host_sums(device)
        self.vec = torch.zeros(2, dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        self.data = self.kl = 0.0
        if not self.host:
            self.vec.zero_()
        self.metrics: dict[str, Any] = {}
        self.count, self.seconds = 0, 0.0

    def add(self, res: Any, bs: int) -> bool:
        """Add one step; ``False`` when its loss is known to be NaN/inf (CPU)."""
        self.count += bs
        if self.host:
            d, k = res.data.item(), res.kl.item()
            self.data += d * bs
            self.kl += k * bs
            for name, v in res.metrics.items():
                self.metrics[name] = self.metrics.get(name, 0.0) + v.item()
            return math.isfinite(d) and math.isfinite(k)
        self.vec.add_(torch.stack((res.data, res.kl)), alpha=bs)
        for name, v in res.metrics.items():
            acc = self.metrics.get(name)
            self.metrics[name] = v.double() if acc is None else acc.add_(v)
        return True

    def finite(self) -> bool:
        if self.host:
            return math.isfinite(self.data) and math.isfinite(self.kl)
        return bool(torch.isfinite(self.vec).all())

    def totals(self) -> tuple[list[str], list[float]]:
        """``(metric names, [sum bs J, sum bs KL, examples, *metric sums])`` on the host."""
        head = [self.data, self.kl] if self.host else self.vec.tolist()
        if not self.metrics:
            return [], [*head, float(self.count)]
        names = sorted(self.metrics)
        return names, [*head, float(self.count), *[float(self.metrics[k]) for k in names]]

    def mean_loss(self, kl_weight: float) -> float:
        _, tot = self.totals()
        return (tot[0] + kl_weight * tot[1]) / max(tot[2], 1.0)

    def state(self) -> dict[str, Any]:
        names, tot = self.totals()
        metrics = dict(zip(names, tot[3:]))
        return {
            "data": tot[0],
            "kl": tot[1],
            "count": self.count,
            "seconds": self.seconds,
            "metrics": metrics,
        }

    def load(self, d: dict[str, Any]) -> None:
        self.reset()
        self.count, self.seconds = int(d["count"]), float(d["seconds"])
        if self.host:
            self.data, self.kl, self.metrics = float(d["data"]), float(d["kl"]), dict(d["metrics"])
        else:
            self.vec = torch.tensor([d["data"], d["kl"]], dtype=torch.float64, device=self.device)
            self.metrics = {
                k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in d["metrics"].items()
            }


def fit(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], Tensor] | None,
    train_data: Any,
    config: TrainConfig | None = None,
    *,
    optimizer: OptimizerFactory | None = None,
    scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None,
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    step_fn: Callable[[torch.nn.Module, Any, Any], Tensor] | None = None,
    forward: Callable[[Any], Any] | None = None,
    transform: Callable[[Any, Tensor], tuple[Any, Any]] | None = None,
    metrics: Callable[[Any, Any], dict[str, Tensor]] | None = None,
    callbacks: Sequence[Callback] = (),
    parallel: Parallel | None = None,
    meta: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> History:
    """Train ``model`` on ``train_data``, minimising ``mean J + kl_weight KL(q||p)``.

    Args:
        model: a ``dualflow.nn`` network, a :class:`dualflow.methods.Method`, or any module
            (KL is 0 without Bayesian layers).
        loss_fn: ``loss_fn(outputs, targets) -> mean J``; a module (e.g.
            :class:`dualflow.losses.GaussianLikelihood`) trains with the model.
        train_data: ``(inputs, targets)`` tensors, a ``Dataset`` or a loader (:mod:`dualflow.train.data`).
        config: :class:`TrainConfig` (epochs, batch size, optimizer, seed, checkpoint, AMP, threads, ...).
        optimizer: factory ``params -> Optimizer`` replacing :func:`make_optimizer`.
        scheduler: factory ``(optimizer, total_steps) -> LR scheduler`` stepped every batch
            (default: ``config.schedule``).
        eval_fn: ``eval_fn(model) -> dict`` at every epoch end (eval mode, no grad); joins the record.
        step_fn: ``step_fn(model, x, targets) -> mean J`` replacing ``loss_fn(forward(x), targets)``.
        forward: ``forward(x) -> outputs`` given to ``loss_fn`` (default ``model(x)``).
        transform: batch transform ``(x, y) -> (x, targets)`` run on the device before the
            forward (augmentation; mixup/cutmix return :class:`~dualflow.train.MixedTargets`,
            whose loss is ``lam J(y_a) + (1 - lam) J(y_b)``). It may draw from the global
            RNG, which ``fit`` seeds and checkpoints.
        metrics: ``metrics(outputs, targets) -> {name: batch sum}`` (no grad); each epoch's
            record gets ``name: sum / examples``.
        callbacks: :class:`~dualflow.train.Callback` s (after ``eval_fn``), e.g. logging,
            :class:`~dualflow.train.StopAfter`.
        parallel: :class:`~dualflow.train.Parallel` hooks for distributed data parallel.
        meta: description of the run stored in the checkpoint; resuming with other ``meta``
            is refused (:class:`~dualflow.train.CheckpointError`).
        device: where to train (default: the model's device).

    Returns:
        :class:`History` of per-epoch records. The caller's global RNG states, thread
        count and flush-denormal mode are as they were before the call.

    Raises:
        FloatingPointError: the objective became NaN/inf (names the epoch and steps).
        CheckpointError: ``config.checkpoint`` is unreadable or from another run.
    """
    cfg = config or TrainConfig()
    par = parallel or Parallel()
    dev = _device(model, device)
    _to(model, dev)
    if isinstance(loss_fn, torch.nn.Module):
        _to(loss_fn, dev)
    source = batch_source(train_data, cfg.batch_size, cfg.seed, cfg.drop_last, dev)
    if cfg.kl_weight is not None:
        kl_weight = cfg.kl_weight
    else:
        n = data_size(train_data)
        if n is None:
            raise ValueError("this loader does not say how many examples it has: set TrainConfig.kl_weight")
        kl_weight = 1.0 / n
    objective = Objective(
        model,
        loss_fn,
        kl_weight,
        forward=forward,
        step_fn=step_fn,
        metrics=metrics,
        amp_device=dev if cfg.amp else None,
    )
    params = [p for p in objective.parameters() if p.requires_grad]  # (parameters() drops duplicates)
    opt = optimizer(params) if optimizer is not None else make_optimizer(params, cfg, model=model)
    per_epoch = source.num_batches
    total = max(1, per_epoch * cfg.epochs)
    if scheduler is not None:
        sched = scheduler(opt, total)
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    else:
        sched = None
    cbs: list[Callback] = ([EvalCallback(eval_fn)] if eval_fn is not None else []) + list(callbacks)
    step_cbs = [c for c in cbs if type(c).on_step_end is not Callback.on_step_end]
    run = _Run(cfg, objective, par.wrap(objective), opt, sched, par, dict(meta or {}), dev)

    with ExitStack() as stack:
        stack.enter_context(num_threads(cfg.threads))
        if cfg.threads is None:
            check_threads(dev)
        stack.enter_context(flush_denormal(True))
        stack.enter_context(amp_hooks(model, cfg.amp))
        stack.enter_context(seeded(None))  # the caller's RNG states come back on exit
        pos = run.resume()
        if pos is None:
            seed_everything(stream_seed(cfg.seed, par.rank))
        start_epoch, start_step = pos or (0, 0)
        state = LoopState(model, run.history, start_epoch, start_step, per_epoch, cfg.epochs, pos)
        run.history.resumed_from = pos
        for c in cbs:
            c.on_train_start(state)
        _train(run, source, state, cbs, step_cbs, transform, cfg, per_epoch, total)
    model.eval()
    return run.history


def _train(
    run: _Run,
    source: Any,
    state: LoopState,
    cbs: list[Callback],
    step_cbs: list[Callback],
    transform: Callable[[Any, Tensor], tuple[Any, Any]] | None,
    cfg: TrainConfig,
    per_epoch: int,
    total: int,
) -> None:
    from tqdm import tqdm

    model, opt, sched, sums = run.model, run.opt, run.sched, run.sums
    # one process: call the objective directly (nothing hooks it); DDP: through its wrapper
    forward = run.objective.forward if run.runner is run.objective else run.runner
    clip = cfg.grad_clip
    params = [p for g in opt.param_groups for p in g["params"]] if clip is not None else []
    keep_rng = bool(cfg.checkpoint) and not run.par.enabled  # for a save on Ctrl-C
    check_every, save_every = cfg.check_every, cfg.checkpoint_every
    show = cfg.progress and run.par.is_main
    bar = tqdm(
        total=total,
        initial=state.global_step,
        disable=not show,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        leave=False,
    )
    epoch, done = state.epoch, state.step
    rng_done = RNGState.capture() if keep_rng else None
    try:
        for epoch in range(state.epoch, cfg.epochs):
            if not model.training:  # (walking the modules every epoch costs as much as a small step)
                model.train()
            start = done = state.step if epoch == state.epoch else 0
            state.epoch, state.step = epoch, start
            checked = start
            t0 = time.perf_counter()
            batches = (source.full,) if source.full is not None and start == 0 else source.epoch(epoch, start)
            for xb, yb in batches:
                if transform is not None:
                    xb, yb = transform(xb, yb)
                opt.zero_grad(set_to_none=True)
                res = forward(xb, yb)
                res.loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                if sched is not None:
                    sched.step()
                ok = sums.add(res, yb.size if isinstance(yb, MixedTargets) else int(yb.shape[0]))
                done = state.step = done + 1
                if keep_rng:
                    rng_done = RNGState.capture()
                if show:
                    bar.update(1)
                if not ok or done - checked >= check_every:
                    run.check_finite(epoch, done, checked if ok else done - 1)
                    checked = done
                    if show:
                        loss = sums.mean_loss(run.objective.kl_weight)
                        bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}", refresh=False)
                for c in step_cbs:
                    c.on_step_end(state)
                stop = state.stop_requested and done != per_epoch
                if stop or (save_every and state.global_step % save_every == 0 and done != per_epoch):
                    run.check_finite(epoch, done, checked)
                    sums.seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    run.save(epoch, done)
                    if stop:
                        run.history.stopped = True
                        run.history.steps = state.global_step
                        return
            sums.seconds += time.perf_counter() - t0
            rec = run.record(epoch)
            for c in cbs:
                c.on_epoch_end(state, rec)
            run.history.epochs.append(rec)
            sums.reset()
            state.epoch, state.step = epoch + 1, 0
            run.save(epoch + 1, 0)
            done = 0
            if state.stop_requested and epoch + 1 < cfg.epochs:
                run.history.stopped = True
                break
        run.history.steps = state.global_step
    except KeyboardInterrupt:
        # keep what was computed: the next call with the same checkpoint resumes here
        # (one process only: collective operations are unsafe while another rank runs on)
        if keep_rng and run.sums.finite():
            run.save(epoch, done, rng_done)
        raise
    finally:
        bar.close()


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    x: Tensor | Gaussian,
    batch_size: int = 1024,
    *,
    noise_var: float | Tensor | None = None,
) -> Gaussian:
    """Moments of the network output ``f(x)`` of ``model`` in eval mode, in batches.

    A bare network knows no likelihood, so by default the variance is that of ``f(x)``
    alone (the weight uncertainty propagated by Algorithm 1), *without* observation noise.
    Pass ``noise_var`` (e.g. ``likelihood.noise_var``) to get the predictive of ``y``,
    ``N(m, v + noise_var)``: what :meth:`dualflow.methods.Method.predict` returns by default.

    Returns:
        :class:`~dualflow.Gaussian` with mean and variance ``(B, D)``.
    """
    was = model.training
    model.eval()
    p0 = next(model.parameters(), None)
    dev = p0.device if p0 is not None else (x.mean if isinstance(x, Gaussian) else x).device
    n = (x.mean if isinstance(x, Gaussian) else x).shape[0]
    try:
        outs = []
        for i in range(0, n, batch_size):
            xb = (
                x.at(torch.arange(i, min(i + batch_size, n)))
                if isinstance(x, Gaussian)
                else x[i : i + batch_size]
            )
            outs.append(as_gaussian(model(xb.to(dev))))
    finally:
        model.train(was)
    mean, var = torch.cat([o.mean for o in outs]), torch.cat([o.var for o in outs])
    if noise_var is not None:
        var = var + torch.as_tensor(noise_var, dtype=var.dtype, device=var.device)
    return Gaussian(mean, var)
