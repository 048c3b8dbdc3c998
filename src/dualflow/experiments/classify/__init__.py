"""Image classification as in the paper's Table 1: train, evaluate, checkpoint, report.

``train_and_evaluate(config, workdir)`` (:mod:`~dualflow.experiments.classify.runner`)
trains one (data set, architecture, method) with the settings of :class:`ClassifyConfig`
(:mod:`~dualflow.experiments.classify.config`) through the one training loop
(:meth:`dualflow.methods.Method.fit`, i.e. :func:`dualflow.train.fit`) and returns a
JSON-able record with the test error (a fraction), NLL, ECE (15 bins) and Brier score of
the predictive distribution (:mod:`dualflow.experiments.metrics`), the per-epoch log and
the timings; :mod:`~dualflow.experiments.classify.report` draws the learning curves and
the Table-1 report. The ``dualflow classify`` command
(:mod:`dualflow.experiments.commands.classify`) is a thin wrapper around it.

Table-1 configurations (``normalization="auto"``):

=========================  ==========================  =================================
paper                      ``--method``                architecture variant
=========================  ==========================  =================================
vanilla NN                 ``vanilla``                 BatchNorm, point weights, SGD
reparam.                   ``reparam``                 BatchNorm, Bayes-by-backprop
reparam./NF+NG+ensemble    ``reparam-ng-ensemble``     no normalisation, NG, 4 samples
BP/NF                      ``bp``                      no normalisation, Algorithm 1
BP/NF+NG                   ``bp-ng``                   no normalisation, Algorithm 1, NG
=========================  ==========================  =================================

Objective (the paper's Eq. 2, per mini-batch): ``mean_batch J + kl_weight * KL(q||p) / N``
with ``N`` the number of training examples; ``kl_weight = 1`` *is* Eq. 2. Other values
temper the KL (not the paper's objective; recorded in every result). For the
natural-gradient methods the same tempering is applied by giving
:class:`~dualflow.optim.NaturalGradient` the data size ``N / kl_weight`` (its prior
precision then enters as ``kl_weight * lambda0 / N``, consistent with the tempered loss).

Optimisers: SGD with Nesterov momentum (default for point networks: lr 0.1, weight decay
5e-4) or Adam (default for Bayesian networks: lr 1e-3, no weight decay); cosine annealing to
0 over all steps. Weight decay acts on point parameters only (normalisation affines, point
weights, residual gains): the Gaussian weights ``(mu, rho)`` are regularised by the KL, and
decaying ``rho`` would pull every ``sigma`` towards ``softplus(0) = 0.69``. The NG methods
update the Gaussian weights by natural gradient and the point parameters by Adam.

Mixed precision (``amp=True``, :func:`dualflow.train.mixed_precision`): bf16 autocast of the
matrix products and convolutions of *every* method, moment propagation included, with
everything else in float32: a forward hook casts the output moments of every Bayesian/point
layer (:class:`dualflow.nn.BayesLayer`) back to float32 and BatchNorm runs in float32, so
the elementwise moment rules (ReLU's ``Phi(m/s)``, ``1 - Phi``, Clark's max, the probit
softmax), the residual additions, the loss and the KL never see bf16. Why the variance
maps may run in bf16: ``v' = A_{mu^2}(v) + A_{sigma^2}(m^2 + v) + b_var`` is a sum of
*non-negative* products, so bf16 inputs with an fp32 accumulator give a relative error of
the order of bf16's 2^-8 and no cancellation, and bf16 has float32's exponent range, so
small variances do not underflow. float16 is not
offered: variances of 1e-8 (routine for trained weight noise) lie below its normal range.
Measured: see ``results/classify/README.md`` and ``tests/test_classify.py``.

Distributed data parallel: launched by ``torchrun``, every rank trains on its shard of
each epoch (:mod:`dualflow.experiments.distributed` supplies the loop's
:class:`dualflow.train.Parallel` hooks), gradients are averaged by DDP, the metrics are
summed over ranks and only rank 0 writes files. BatchNorm uses per-rank batch
statistics (as plain DDP without SyncBatchNorm).

Checkpoints and exact resumption (those of :func:`dualflow.train.fit`): the data order
of epoch ``e`` is a function of ``(seed, e)``; a checkpoint holds the model, optimizer,
scheduler, history, position ``(epoch, step)``, the running sums of the epoch and the RNG
state of every rank, so an interrupted run resumed with ``resume=True`` gives the same
numbers as an uninterrupted one (tested).
"""

from dualflow.experiments.classify.config import (
    AUGMENTS,
    DEFAULT_KL_WEIGHT,
    PAPER_TABLE1,
    TABLE1_LABELS,
    TABLE1_METHODS,
    TABLE1_NORMALIZATION,
    ClassifyConfig,
    Resolved,
    arch_family,
    config_fields,
    parse_augment,
    resolve,
)
from dualflow.experiments.classify.report import load_records, plot_history, report_classify
from dualflow.experiments.classify.runner import evaluate, train_and_evaluate

__all__ = [
    "AUGMENTS",
    "DEFAULT_KL_WEIGHT",
    "PAPER_TABLE1",
    "TABLE1_LABELS",
    "TABLE1_METHODS",
    "TABLE1_NORMALIZATION",
    "ClassifyConfig",
    "Resolved",
    "arch_family",
    "config_fields",
    "evaluate",
    "load_records",
    "parse_augment",
    "plot_history",
    "report_classify",
    "resolve",
    "train_and_evaluate",
]
