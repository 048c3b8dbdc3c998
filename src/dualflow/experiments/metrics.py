"""Classification metrics of a predictive distribution: error, NLL, ECE and Brier score.

All take class probabilities ``probs`` ``(B, C)`` (rows summing to 1, e.g.
:meth:`dualflow.methods.Method.predict`) and integer labels ``y`` ``(B,)``.

* **error**: fraction of examples whose most probable class (``argmax``, ties to the lowest
  index) is not the label.
* **NLL**: ``-mean log p(y | x)``; a probability of exactly 0 is read as the smallest
  positive normal number of the dtype (``-log`` of it is ~87.3 in float32), so one
  overconfident mistake gives a large but finite value.
* **ECE** (Naeini et al. 2015; Guo et al. 2017): ``sum_b (n_b / n) |acc_b - conf_b|`` over
  ``bins`` (default 15) equal-width bins of the confidence ``max_c p_c``, right-closed
  (bin ``b`` holds ``b/bins < conf <= (b+1)/bins``); ``acc_b`` and ``conf_b`` are the mean
  accuracy and confidence in the bin; empty bins contribute 0.
* **Brier** score (Brier 1950), multi-class form: ``mean_i sum_c (p_ic - 1[y_i = c])^2``,
  in ``[0, 2]`` (the convention of uncertainty-baselines; divide by ``C`` for the
  per-class average some papers use).

For data split over several processes every metric is a function of a fixed-length vector
of *sums* (:func:`metric_sums`), which the processes add up (``all_reduce``) before
:func:`finalize`; sums are kept in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ECE_BINS",
    "brier_score",
    "classification_metrics",
    "error_rate",
    "expected_calibration_error",
    "finalize",
    "metric_sums",
    "nll",
]

#: Number of confidence bins of the ECE (as in Guo et al. 2017).
ECE_BINS = 15


def _check(probs: Tensor, y: Tensor) -> None:
    if not isinstance(probs, Tensor) or probs.dim() != 2:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"probs must have shape (B, C), got {shape}")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != probs.shape[0]:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"labels must have shape ({probs.shape[0]},), got {shape}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}), got [{int(y.min())}, {int(y.max())}]")


def _bin_index(conf: Tensor, bins: int) -> Tensor:
    """Right-closed equal-width bins: ``b/bins < conf <= (b+1)/bins`` -> ``b`` (``conf = 0`` -> 0)."""
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=conf.dtype, device=conf.device)[1:-1]
    return torch.bucketize(conf, edges, right=False)


def metric_sums(probs: Tensor, y: Tensor, bins: int = ECE_BINS) -> Tensor:
    """The additive statistics of the metrics, float64 of length ``4 + 3 bins``:
    ``[n, sum NLL, sum errors, sum Brier, n per bin, sum confidence per bin, sum correct per bin]``."""
    _check(probs, y)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p = probs.detach().to(torch.float64)
    y = y.to(p.device).long()
    tiny = torch.finfo(probs.dtype).tiny if probs.is_floating_point() else torch.finfo(torch.float32).tiny
    py = p.gather(1, y[:, None]).squeeze(1)
    nll_sum = -torch.log(py.clamp_min(tiny)).sum()
    conf, pred = p.max(1)
    correct = (pred == y).to(torch.float64)
    brier = (p * p).sum(1) - 2.0 * py + 1.0
    idx = _bin_index(conf, bins)
    out = torch.zeros(4 + 3 * bins, dtype=torch.float64, device=p.device)
    out[0] = p.shape[0]
    out[1] = nll_sum
    out[2] = (1.0 - correct).sum()
    out[3] = brier.sum()
    out[4 : 4 + bins].index_add_(0, idx, torch.ones_like(conf))
    out[4 + bins : 4 + 2 * bins].index_add_(0, idx, conf)
    out[4 + 2 * bins :].index_add_(0, idx, correct)
    return out


def finalize(sums: Tensor, bins: int = ECE_BINS) -> dict[str, float]:
    """``{"error", "nll", "ece", "brier", "n"}`` from (summed) :func:`metric_sums`."""
    s = sums.detach().to("cpu", torch.float64)
    if s.shape != (4 + 3 * bins,):
        raise ValueError(f"expected {4 + 3 * bins} sums for {bins} bins, got shape {tuple(s.shape)}")
    n = float(s[0])
    if n <= 0:
        raise ValueError("no examples")
    cnt, conf, acc = s[4 : 4 + bins], s[4 + bins : 4 + 2 * bins], s[4 + 2 * bins :]
    ece = float((conf - acc).abs().sum() / n)  # sum_b n_b/n |acc_b/n_b - conf_b/n_b|
    return {
        "error": float(s[2]) / n,
        "nll": float(s[1]) / n,
        "ece": ece,
        "brier": float(s[3]) / n,
        "n": round(n),
        "nonempty_bins": int((cnt > 0).sum()),
    }


def classification_metrics(probs: Tensor, y: Tensor, bins: int = ECE_BINS) -> dict[str, float]:
    """All metrics at once: ``{"error", "nll", "ece", "brier", "n", "nonempty_bins"}``."""
    return finalize(metric_sums(probs, y, bins), bins)


def error_rate(probs: Tensor, y: Tensor) -> float:
    """Fraction of wrong ``argmax`` predictions."""
    return classification_metrics(probs, y)["error"]


def nll(probs: Tensor, y: Tensor) -> float:
    """``-mean log p(y | x)``."""
    return classification_metrics(probs, y)["nll"]


def expected_calibration_error(probs: Tensor, y: Tensor, bins: int = ECE_BINS) -> float:
    """ECE with ``bins`` equal-width, right-closed confidence bins (default 15)."""
    return classification_metrics(probs, y, bins)["ece"]


def brier_score(probs: Tensor, y: Tensor) -> float:
    """Multi-class Brier score ``mean_i sum_c (p_ic - onehot_ic)^2`` in ``[0, 2]``."""
    return classification_metrics(probs, y)["brier"]
