"""Image-classification architectures built from :mod:`dualflow.nn`.

``create(name, ...)`` returns an :class:`ImageClassifier` mapping ``(B, C, H, W)`` images
(a tensor or a :class:`dualflow.Gaussian`) to ``(B, num_classes)`` logit moments. Each
architecture has

* a **normalisation-free** variant (``normalization="none"``, the BP/NF configurations of
  the paper's Table 1): no normalisation layers, biases on all convolutions, and for the
  residual networks a learnable gain on every residual branch, initialised at
  ``1/sqrt(number of branches)`` (see :mod:`dualflow.models.resnet` for why);
* a **normalised** variant (``normalization="batch"``: BatchNorm after each convolution;
  LayerNorm for MLP-Mixer, which also accepts ``"layer"``), the "vanilla NN" and "reparam."
  configurations;

and both exist with mean-field Gaussian weights (``bayes=True``) or point weights
(``bayes=False``, the ordinary network: a plain-tensor input gives a plain-tensor output).

The registry (:data:`MODELS`) is an explicit dict; importing this package builds nothing.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dualflow.models.base import ImageClassifier
from dualflow.models.blocks import ACT_GAINS, LayerFactory, Scale
from dualflow.models.densenet import build_densenet_bc
from dualflow.models.efficientnet import build_efficientnet
from dualflow.models.mixer import build_mixer
from dualflow.models.mlp import build_mlp, build_vgg
from dualflow.models.resnet import build_resnet, build_wrn
from dualflow.nn.base import BayesLayer
from dualflow.nn.sampling import sampled_parameters

__all__ = [
    "ACT_GAINS",
    "MODELS",
    "ImageClassifier",
    "LayerFactory",
    "ModelSpec",
    "Scale",
    "builder",
    "copy_means_",
    "count_parameters",
    "create",
    "list_models",
    "point_state_dict",
    "zero_variances_",
]


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: the build function, its fixed defaults and a one-line description."""

    build: Callable[..., torch.nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    norms: tuple[str, ...] = ("none", "batch")


def _resnet(depth: int) -> ModelSpec:
    return ModelSpec(build_resnet, {"depth": depth}, f"CIFAR ResNet-{depth} (option A shortcuts)")


#: name -> :class:`ModelSpec`. Keyword arguments of :func:`create` override the defaults.
MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(build_mlp, {}, "MLP on flattened images (width=400, depth=2 hidden layers)"),
    "vgg16": ModelSpec(build_vgg, {}, "VGG16 for 32x32 images, one linear classifier (Wen et al. 2018)"),
    "resnet": ModelSpec(build_resnet, {}, "CIFAR ResNet, depth=6n+2 (default 20)"),
    "resnet8": _resnet(8),
    "resnet20": _resnet(20),
    "resnet32": _resnet(32),
    "resnet44": _resnet(44),
    "resnet56": _resnet(56),
    "resnet110": _resnet(110),
    "wrn": ModelSpec(build_wrn, {}, "Wide ResNet, depth=6N+4, widen_factor (default 28-10)"),
    "wrn_28_10": ModelSpec(build_wrn, {"depth": 28, "widen_factor": 10}, "Wide ResNet 28-10"),
    "densenet_bc": ModelSpec(build_densenet_bc, {}, "DenseNet-BC, depth=6n+4, growth_rate (default 100-12)"),
    "densenet_bc_100_12": ModelSpec(
        build_densenet_bc, {"depth": 100, "growth_rate": 12}, "DenseNet-BC L=100 k=12"
    ),
    "efficientnet_b0": ModelSpec(build_efficientnet, {}, "EfficientNet-B0 (SiLU, squeeze-excite, depthwise)"),
    "mixer_s": ModelSpec(
        build_mixer, {}, "MLP-Mixer-S (patch_size=4 for 32x32)", norms=("none", "batch", "layer")
    ),
}

_COMMON = ("image_size", "init_var_ratio", "prior_var", "dropout", "act_method")


def list_models() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(MODELS)


def _spec(name: str) -> ModelSpec:
    if not isinstance(name, str) or name not in MODELS:
        close = difflib.get_close_matches(str(name), list(MODELS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; known: {', '.join(list_models())}")
    return MODELS[name]


def _options(spec: ModelSpec) -> list[str]:
    params = list(inspect.signature(spec.build).parameters)
    return [p for p in params if p not in ("make", "num_classes", "in_channels", "image_size")]


def create(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    normalization: str = "none",
    bayes: bool = True,
    *,
    image_size: int | None = None,
    init_var_ratio: float = 0.01,
    prior_var: float | None = None,
    dropout: float = 0.0,
    act_method: str = "gh",
    **kw: Any,
) -> ImageClassifier:
    """Build architecture ``name`` (see :func:`list_models`).

    Args:
        name: registry name, e.g. ``"resnet20"``, ``"wrn_28_10"``, ``"mixer_s"``.
        num_classes: outputs.
        in_channels: image channels (1 for MNIST, 3 for CIFAR).
        normalization: ``"none"`` (normalisation-free) or ``"batch"``; ``"layer"`` for ``mixer_s``.
        bayes: mean-field Gaussian weights or point weights.
        image_size: square input side; default 28 when ``in_channels == 1`` (MNIST), else 32.
        init_var_ratio, prior_var: passed to every Bayesian layer (:class:`dualflow.nn.Linear`).
        dropout: dropout rate at the architecture's dropout positions (needs
            ``dualflow.nn.Dropout``; 0 builds none).
        act_method: moment rule of SiLU/GELU, ``"gh"`` (Gauss-Hermite) or ``"taylor"``.
        **kw: architecture options overriding the registry defaults:
            ``mlp``: ``width``, ``depth``; ``vgg16``: ``width`` (channel multiplier),
            ``blocks``, ``channels``, ``pool``; ``resnet*``: ``depth``, ``widths``,
            ``skip_init``; ``wrn*``: ``depth``, ``widen_factor``, ``skip_init``;
            ``densenet_bc*``: ``depth``, ``growth_rate``, ``compression``,
            ``bottleneck_width``; ``efficientnet_b0``: ``width_mult``, ``depth_mult``,
            ``stem_stride``, ``stage_strides``, ``se_ratio``, ``skip_init``; ``mixer_s``:
            ``patch_size``, ``hidden_dim``, ``depth``, ``tokens_mlp_dim``,
            ``channels_mlp_dim``, ``skip_init``.

    Returns:
        :class:`ImageClassifier`; ``model.config`` rebuilds it with ``create(**model.config)``.

    Raises:
        ValueError: unknown name, normalisation or option, or an invalid size.
    """
    spec = _spec(name)
    if normalization not in spec.norms:
        raise ValueError(f"{name}: normalization must be one of {spec.norms}, got {normalization!r}")
    if act_method not in ("gh", "taylor"):
        raise ValueError(f"act_method must be 'gh' or 'taylor', got {act_method!r}")
    num_classes, in_channels = int(num_classes), int(in_channels)
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
    if image_size is None:
        image_size = 28 if in_channels == 1 else 32
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    allowed = _options(spec)
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; accepted: {allowed + list(_COMMON)}")
    options = {**spec.defaults, **kw}
    make = LayerFactory(
        bayes=bayes,
        normalization=normalization,
        init_var_ratio=init_var_ratio,
        prior_var=prior_var,
        dropout=dropout,
        act_method=act_method,
    )
    body = spec.build(make, num_classes, in_channels, int(image_size), **options)
    config = {
        "name": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "normalization": normalization,
        "bayes": bool(bayes),
        "image_size": int(image_size),
        "init_var_ratio": init_var_ratio,
        "prior_var": prior_var,
        "dropout": dropout,
        "act_method": act_method,
        **kw,
    }
    return ImageClassifier(
        body,
        arch=name,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=int(image_size),
        normalization=normalization,
        bayes=bayes,
        config=config,
    )


def builder(name: str, **kw: Any) -> Callable[..., ImageClassifier]:
    """The builder convention of the methods registry: ``builder(name, **kw)`` returns
    ``build(bayes: bool, dropout: float = 0.0) -> model`` calling :func:`create` with ``kw``.

    The name is checked at once; ``kw`` may hold any :func:`create` argument except
    ``bayes``/``dropout``.
    """
    _spec(name)
    for k in ("bayes", "dropout"):
        if k in kw:
            raise ValueError(
                f"builder: {k!r} is an argument of the returned build function, not of builder()"
            )

    def build(bayes: bool, dropout: float = 0.0) -> ImageClassifier:
        return create(name, bayes=bayes, dropout=dropout, **kw)

    build.__name__ = f"build_{name}"
    build.__doc__ = f"create({name!r}, bayes=bayes, dropout=dropout, **{kw!r})"
    return build


# ----------------------------------------------------------------------------- helpers


def count_parameters(model: torch.nn.Module, include_variances: bool = False) -> int:
    """Number of parameters as published counts have it: weight means, biases, normalisation
    affines and other point parameters; the ``*_rho`` variance parameters only with
    ``include_variances=True``."""
    total = 0
    for n, p in model.named_parameters():
        if n.endswith("_rho") and not include_variances:
            continue
        total += p.numel()
    return total


def point_state_dict(
    model: torch.nn.Module, sample: bool = False, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """The state dict of the point network (``bayes=False``) of the same architecture: the
    weight means (``sample=False``) or one draw ``mu + sigma eps`` from q (``sample=True``,
    :func:`dualflow.nn.sampling.sampled_parameters`); every other entry (biases of point
    layers, BatchNorm, SkipInit gains) as it is. The variance parameters are dropped."""
    names = {id(p): n for n, p in model.named_parameters()}
    rho = {
        names[id(r)]
        for mod in model.modules()
        if isinstance(mod, BayesLayer) and mod.bayes
        for _, r in mod.variational_pairs()
    }
    out = {k: v for k, v in model.state_dict().items() if k not in rho}
    if sample:
        with torch.no_grad():
            out.update(sampled_parameters(model, generator))
    return out


def copy_means_(src: torch.nn.Module, dst: torch.nn.Module) -> torch.nn.Module:
    """Load the weight means (and all point parameters/buffers) of Bayesian ``src`` into the
    point network ``dst`` of the same architecture; returns ``dst``."""
    dst.load_state_dict(point_state_dict(src))
    return dst


@torch.no_grad()
def zero_variances_(model: torch.nn.Module) -> torch.nn.Module:
    """Set every weight/bias variance of ``model`` to exactly 0 (``rho = -inf``, so
    ``softplus(rho) = 0``): the Bayesian network then computes the point network of its means
    (a diagnostic; the KL term is infinite). Returns ``model``."""
    for mod in model.modules():
        if isinstance(mod, BayesLayer) and mod.bayes:
            for _, rho in mod.variational_pairs():
                rho.fill_(float("-inf"))
    return model
