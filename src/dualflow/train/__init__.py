"""The one training loop every runner uses, and its parts.

Start here: :func:`fit` (in :mod:`dualflow.train.loop`) trains any module on
``mean_batch J + kl_weight KL(q||p)`` (the paper's Eq. 2). Every runner goes through it:
:meth:`dualflow.methods.Method.fit` (UCI, gradvar/convergence, quickstart) and the image
classifier (:mod:`dualflow.experiments.classify`). The parts it is built from:

==============================  ===============================================================
part                            what it does
==============================  ===============================================================
:class:`TrainConfig`            epochs, batch size, optimizer, schedule, seed, checkpoint, AMP,
                                threads (:mod:`~dualflow.train.config`)
batch source                    order of epoch ``e`` is a function of ``(seed, e)``; tensors,
                                Datasets, loaders (:mod:`~dualflow.train.data`)
:class:`Objective`              one step's ``J + kl_weight KL``, mixed targets
                                (:class:`MixedTargets`), optional bf16 forward; the module DDP
                                wraps (:mod:`~dualflow.train.objective`)
:func:`make_optimizer`          Adam / AdamW / SGD from the config (or pass a factory)
:class:`Checkpoint`             model, optimizer, scheduler, history, position, running sums,
                                RNG states; atomic save, one clear load error
                                (:mod:`~dualflow.train.state`)
:class:`Callback`               epoch-end evaluation and logging, step hooks,
                                :class:`StopAfter` (:mod:`~dualflow.train.hooks`)
:class:`Parallel`               distributed data parallel hooks supplied by the caller
numeric modes                   :func:`seeded`, :func:`flush_denormal`, :func:`tf32`,
                                :func:`num_threads`, :func:`mixed_precision` -- context managers
                                restored on exit (:mod:`~dualflow.train.numerics`)
==============================  ===============================================================

>>> import dualflow as df
>>> net = df.nn.Sequential(df.nn.Linear(3, 50), df.nn.ReLU(), df.nn.Linear(50, 1, gain=1.0))
>>> lik = df.losses.GaussianLikelihood(noise_var=0.5)
>>> hist = df.train.fit(net, lik, (x, y), df.train.TrainConfig(epochs=100, threads=1))  # doctest: +SKIP
>>> hist[-1]["loss"], hist["nll"][:3]  # doctest: +SKIP
>>> p = df.train.predict(net, x_test, noise_var=lik.noise_var)  # y's predictive  # doctest: +SKIP
"""

from dualflow.train.config import History, TrainConfig
from dualflow.train.data import BatchSource, batch_source, data_size
from dualflow.train.hooks import Callback, EvalCallback, LoopState, Parallel, StopAfter
from dualflow.train.loop import fit, make_optimizer, predict
from dualflow.train.numerics import (
    add_amp_hooks,
    amp_hooks,
    autocast,
    check_threads,
    denormals_flushed,
    flush_denormal,
    mixed_precision,
    num_threads,
    tf32,
)
from dualflow.train.objective import MixedTargets, Objective, StepResult, mixed_loss
from dualflow.train.state import Checkpoint, CheckpointError, RNGState, seed_everything, seeded

__all__ = [
    "BatchSource",
    "Callback",
    "Checkpoint",
    "CheckpointError",
    "EvalCallback",
    "History",
    "LoopState",
    "MixedTargets",
    "Objective",
    "Parallel",
    "RNGState",
    "StepResult",
    "StopAfter",
    "TrainConfig",
    "add_amp_hooks",
    "amp_hooks",
    "autocast",
    "batch_source",
    "check_threads",
    "data_size",
    "denormals_flushed",
    "fit",
    "flush_denormal",
    "make_optimizer",
    "mixed_loss",
    "mixed_precision",
    "num_threads",
    "predict",
    "seed_everything",
    "seeded",
    "tf32",
]
