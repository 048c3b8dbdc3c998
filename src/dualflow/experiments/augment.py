"""Batched, vectorised image augmentation on ``(B, C, H, W)`` tensors (uint8 or float).

* :func:`random_crop_flip`: zero-pad by ``padding`` and take a random ``H x W`` crop, then a
  random horizontal flip (He et al. 2016's CIFAR augmentation) -- one ``gather`` per axis
  for the whole batch, on whatever device the batch is on;
* :func:`mixup` (Zhang et al. 2018) and :func:`cutmix` (Yun et al. 2019), and
  :class:`MixAugment`, which picks one of them per batch as the paper's training recipe;
* :func:`randaugment` (Cubuk et al. 2020) through ``kornia`` when it is installed
  (``pip install kornia``; it works with this torch and needs no torchvision);
* :func:`normalize`, :func:`train_transform`, :func:`eval_transform`.

How losses consume mixed targets: :func:`mixup`/:func:`cutmix` return the mixed inputs and
a :class:`dualflow.train.MixedTargets` ``(y_a, y_b, lam)``. The loss is
``lam * loss(out, y_a) + (1 - lam) * loss(out, y_b)`` (:func:`dualflow.train.mixed_loss`),
which for any loss linear in the one-hot target -- cross-entropy, and
:func:`dualflow.losses.categorical_nll` ``-log E softmax(z)_y`` -- equals the loss against
the soft target ``lam onehot(y_a) + (1 - lam) onehot(y_b)`` (:meth:`MixedTargets.soft`).
The one training loop combines it for every loss: give :func:`dualflow.train.fit` (or
:meth:`dualflow.methods.Method.fit`) the batch transform::

    mix = MixAugment(mixup_alpha=0.2, cutmix_alpha=1.0)
    method.fit(data, config, transform=mix)   # (x, y) -> (mixed x, MixedTargets)

Randomness: every function takes an optional ``torch.Generator``; without one it draws
from torch's global generator (which ``fit`` seeds and checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dualflow.train.objective import MixedTargets

__all__ = [
    "MixAugment",
    "MixedTargets",
    "cutmix",
    "eval_transform",
    "mixup",
    "normalize",
    "randaugment",
    "random_crop_flip",
    "train_transform",
]


def _check_images(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a tensor of images, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise TypeError(f"{name}: expected uint8 or floating-point images, got {x.dtype}")


def _check_labels(x: Tensor, y: Tensor, name: str) -> None:
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{name}: labels must have shape ({x.shape[0]},), got {shape}")


def _cpu_gen(generator: torch.Generator | None) -> torch.Generator | None:
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("pass a CPU torch.Generator (random indices are drawn on the CPU)")
    return generator


def random_crop_flip(
    x: Tensor,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
    fill: float = 0,
) -> Tensor:
    """Random ``H x W`` crop of the ``padding``-padded images and a random horizontal flip
    (probability 1/2), independently per image; vectorised (two ``gather``\\ s).

    Every output pixel is an input pixel of the same image and channel, or ``fill`` (the
    padding), so labels, dtype and value range are kept.

    Args:
        x: ``(B, C, H, W)`` uint8 or float.
        padding: pixels padded on each side (0: flip only).
        flip: also flip horizontally.
        generator: CPU generator (default: torch's global one).
        fill: padding value (0 = black for uint8; use the mean for normalised floats if wanted).
    """
    _check_images(x, "random_crop_flip")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    g = _cpu_gen(generator)
    b, c, h, w = x.shape
    p = int(padding)
    dev = x.device
    oy = torch.randint(0, 2 * p + 1, (b,), generator=g).to(dev)
    ox = torch.randint(0, 2 * p + 1, (b,), generator=g).to(dev)
    do_flip = (torch.rand(b, generator=g) < 0.5).to(dev) if flip else None
    if p == 0 and not flip:
        return x.clone()
    xp = F.pad(x, (p, p, p, p), value=fill) if p else x
    rows = oy[:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = ox[:, None] + torch.arange(w, device=dev)  # (B, W)
    if do_flip is not None:
        cols = torch.where(do_flip[:, None], cols.flip(1), cols)
    out = xp.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * p))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if alpha == 1.0:
        return float(torch.rand((), generator=generator))
    if generator is None:
        return float(torch.distributions.Beta(alpha, alpha).sample())
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return float(torch.distributions.Beta(alpha, alpha).sample())


def mixup(
    x: Tensor, y: Tensor, alpha: float = 1.0, generator: torch.Generator | None = None
) -> tuple[Tensor, MixedTargets]:
    """mixup: ``lam x + (1 - lam) x[perm]`` with one ``lam ~ Beta(alpha, alpha)`` per batch
    and a random permutation ``perm`` of the batch.

    Args:
        x: float images ``(B, C, H, W)`` (normalise uint8 images first).
        y: integer labels ``(B,)``.

    Returns:
        ``(mixed x, MixedTargets(y, y[perm], lam))``.
    """
    _check_images(x, "mixup")
    _check_labels(x, y, "mixup")
    if not x.is_floating_point():
        raise TypeError("mixup: expected floating-point images (mixing uint8 would round); normalise first")
    g = _cpu_gen(generator)
    lam = _beta(alpha, g)
    perm = torch.randperm(x.shape[0], generator=g).to(x.device)
    return x * lam + x[perm] * (1.0 - lam), MixedTargets(y, y[perm], lam)


def cutmix(
    x: Tensor, y: Tensor, alpha: float = 1.0, generator: torch.Generator | None = None
) -> tuple[Tensor, MixedTargets]:
    """CutMix: paste one random box from ``x[perm]`` into every image of the batch.

    ``lam ~ Beta(alpha, alpha)``; the box has side ratio ``sqrt(1 - lam)``, a uniformly
    random centre and is clipped to the image; ``lam`` is then recomputed as the exact
    share of pixels kept. Works on uint8 and float images (no arithmetic on pixels).

    Returns:
        ``(mixed x, MixedTargets(y, y[perm], lam))``.
    """
    _check_images(x, "cutmix")
    _check_labels(x, y, "cutmix")
    g = _cpu_gen(generator)
    b, _, h, w = x.shape
    lam = _beta(alpha, g)
    perm = torch.randperm(b, generator=g).to(x.device)
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy = int(torch.randint(0, h, (), generator=g))
    cx = int(torch.randint(0, w, (), generator=g))
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    out = x.clone()
    if y2 > y1 and x2 > x1:
        out[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
    return out, MixedTargets(y, y[perm], lam)


class MixAugment:
    """Per batch: with probability ``prob`` apply cutmix (probability ``switch_prob``) or
    mixup, as enabled by positive ``cutmix_alpha`` / ``mixup_alpha``; otherwise leave the
    batch as it is (targets ``MixedTargets(y, y, 1.0)``). ``__call__(x, y) -> (x, MixedTargets)``.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0")
        if not 0.0 <= prob <= 1.0 or not 0.0 <= switch_prob <= 1.0:
            raise ValueError("prob and switch_prob must lie in [0, 1]")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.generator = _cpu_gen(generator)

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, MixedTargets]:
        g = self.generator
        if not self.active or float(torch.rand((), generator=g)) >= self.prob:
            return x, MixedTargets(y, y, 1.0)
        use_cut = self.cutmix_alpha > 0 and (
            self.mixup_alpha <= 0 or float(torch.rand((), generator=g)) < self.switch_prob
        )
        if use_cut:
            return cutmix(x, y, self.cutmix_alpha, g)
        return mixup(x, y, self.mixup_alpha, g)

    def __repr__(self) -> str:
        return (
            f"MixAugment(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, "
            f"prob={self.prob}, switch_prob={self.switch_prob})"
        )


_RANDAUGMENT: dict[tuple[int, int], object] = {}


def randaugment(x: Tensor, n: int = 2, m: int = 9) -> Tensor:
    """RandAugment with ``n`` operations of magnitude ``m`` (in ``(0, 30)``), per image, by
    ``kornia.augmentation.auto.RandAugment``. Input uint8 or float in [0, 1]; the output
    has the input's dtype.

    Raises:
        ImportError: ``kornia`` is not installed (it is optional: ``pip install kornia``).
    """
    _check_images(x, "randaugment")
    try:
        from kornia.augmentation.auto import RandAugment
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "randaugment needs the optional package kornia (pip install 'kornia>=0.9'); "
            "it works with this torch version and does not need torchvision"
        ) from e
    if not 0 < m < 30:
        raise ValueError(f"randaugment: m must lie in (0, 30), got {m}")
    key = (int(n), int(m))
    if key not in _RANDAUGMENT:
        _RANDAUGMENT[key] = RandAugment(n=key[0], m=key[1])
    op = _RANDAUGMENT[key]
    if x.dtype == torch.uint8:
        out = op(x.float().div_(255.0))  # type: ignore[operator]
        return out.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return op(x).clamp(0.0, 1.0).to(x.dtype)  # type: ignore[operator]


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel ``(x - mean) / std`` as float32. uint8 input is divided by 255 first;
    floating input is taken to be in [0, 1] already. ``mean``/``std`` in [0, 1] units."""
    _check_images(x, "normalize")
    if x.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"normalize: {x.shape[1]} channels but {len(mean)} means and {len(std)} stds")
    xf = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    m = torch.as_tensor(mean, dtype=xf.dtype, device=xf.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=xf.dtype, device=xf.device).view(1, -1, 1, 1)
    return (xf - m) / s


def train_transform(
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_padding: int = 4,
    flip: bool = True,
    randaugment_nm: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> Callable[[Tensor], Tensor]:
    """uint8 batch -> [crop/flip] -> [RandAugment] -> normalised float32 batch.

    ``crop_padding=0, flip=False`` (e.g. MNIST) gives normalisation only. Mixup/cutmix come
    after this, in the training step (they need the labels): see :class:`MixAugment`.
    """

    def transform(x: Tensor) -> Tensor:
        if crop_padding > 0 or flip:
            x = random_crop_flip(x, crop_padding, flip, generator)
        if randaugment_nm is not None:
            x = randaugment(x, *randaugment_nm)
        return normalize(x, mean, std)

    return transform


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """Normalisation only."""
    return lambda x: normalize(x, mean, std)
