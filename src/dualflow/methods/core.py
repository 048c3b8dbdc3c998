"""One learning-method class, configured by :class:`~dualflow.methods.traits.Traits`.

A :class:`Method` holds ``traits.members`` networks (made by a builder, or the user's model)
and, for regression, one Gaussian likelihood per network with its (learned or fixed)
observation noise variance ``tau^2``. Training goes through the one loop,
:func:`dualflow.train.fit`, minimising ``mean_batch J + kl_weight KL(q||p)``, where the data
term ``J`` is :meth:`Method.loss` of :meth:`Method.training_outputs`.

Predictive distributions (:meth:`Method.predictive`, :meth:`Method.predict`):

* regression: a :class:`~dualflow.Gaussian` over ``y`` (mean, variance *including* the
  observation noise ``tau^2``; ``noise=False`` leaves it out). With several passes (weight
  samples, dropout masks, members) the mixture is moment-matched:
  ``mean = avg m_s``, ``var = avg (v_s + tau_s^2) + avg (m_s - mean)^2``;
* classification: class probabilities ``(B, C)``, the average of each pass's
  ``E softmax`` (probit approximation for Gaussian logits, softmax for sampled logits).

With ``traits.noise == "heteroscedastic"`` the noise variance is per input: the network's
second half of outputs is ``log tau^2(x)`` and ``tau_s^2`` above is its expectation
(:class:`~dualflow.losses.HeteroscedasticLikelihood`).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor

from dualflow import losses
from dualflow.gaussian import Gaussian, as_gaussian
from dualflow.methods.propagation import mc_dropout, propagation, set_propagation
from dualflow.methods.traits import Traits
from dualflow.nn.base import PROPAGATIONS, BayesLayer, set_prior
from dualflow.nn.base import kl as model_kl
from dualflow.nn.dropout import Dropout
from dualflow.train import History, Objective, TrainConfig
from dualflow.train import data_size as _examples
from dualflow.train import fit as train_fit

__all__ = ["TASKS", "Method"]

TASKS = ("regression", "classification")
_DROPOUT = (Dropout, torch.nn.modules.dropout._DropoutNd)


def _reinitialise(model: torch.nn.Module) -> torch.nn.Module:
    """Call ``reset_parameters`` of every submodule that has one (a fresh random init)."""
    count = 0
    for mod in model.modules():
        reset = getattr(mod, "reset_parameters", None)
        if callable(reset) and next(mod.parameters(recurse=False), None) is not None:
            reset()
            count += 1
    if count == 0:
        raise ValueError(
            "cannot make independent ensemble members from this model: none of its modules has "
            "reset_parameters(); pass a builder build(bayes, dropout=0.0) instead"
        )
    return model


def _check_model(model: torch.nn.Module, traits: Traits, name: str) -> None:
    gaussian = [m for m in model.modules() if isinstance(m, BayesLayer) and m.bayes]
    if traits.gaussian and not gaussian:
        raise ValueError(
            f"method {name!r} trains Gaussian weights but the model has no dualflow layer with "
            "bayes=True: convert it first (dualflow.nn.from_torch(model)) or pass a builder"
        )
    if not traits.gaussian and gaussian:
        raise ValueError(
            f"method {name!r} trains point weights but the model has Gaussian layers (bayes=True): "
            "pass a point model (e.g. build(bayes=False)) or a builder"
        )
    if traits.mc_dropout and not any(isinstance(m, _DROPOUT) for m in model.modules()):
        raise ValueError(f"method {name!r} (MC dropout) needs a model with dropout modules")


class Method(torch.nn.Module):
    """A learning method: networks, likelihood(s), and how to train and predict, as traits.

    Create registry methods with :func:`dualflow.methods.create`; compose your own with
    ``Method(Traits(...), builder_or_model, task=...)``. ``state_dict`` / ``load_state_dict``
    save and restore everything, :attr:`is_fitted` included.

    Args:
        traits: :class:`~dualflow.methods.Traits`.
        model: a builder ``build(bayes: bool, dropout: float = 0.0) -> module`` called once per
            member, or a ``torch.nn.Module``. A module is used as it is (by reference) as the
            first member; further members are deep copies re-initialised by every submodule's
            ``reset_parameters()`` (under the current global RNG). A module must already have
            the weights the traits need: Gaussian methods need dualflow layers with
            ``bayes=True`` (convert with :func:`dualflow.nn.from_torch`), point methods a model
            without them (any ``torch.nn`` model whose output is a tensor works); otherwise a
            ``ValueError`` says which conversion is needed. MC dropout needs dropout modules
            in the model (``dualflow.nn.Dropout`` or ``torch.nn.Dropout``). A sampling
            propagation is set on the model's layers.
        task: ``"regression"`` (Gaussian likelihood, output ``(B, D)``) or
            ``"classification"`` (output logits ``(B, C)``, integer labels).
        samples: ``S``, forward passes of a sampled predictive distribution.
        noise_var: initial (or fixed) observation noise variance ``tau^2`` (regression; with
            heteroscedastic noise ``e^c``, the noise variance at a zero log-variance output).
        learn_noise: learn ``tau^2`` by gradient (homoscedastic regression).
        name: the method's name (the registry's, or your own).

    The Gaussian layers get the prior ``traits.prior_for(task)`` (:func:`dualflow.nn.set_prior`;
    a module passed in is changed in place; the layers' hyperprior weight
    ``prior_pseudo_count`` is kept).
    """

    def __init__(
        self,
        traits: Traits,
        model: Callable[..., torch.nn.Module] | torch.nn.Module,
        task: str = "regression",
        *,
        samples: int = 32,
        noise_var: float = 1.0,
        learn_noise: bool = True,
        name: str = "custom",
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if task != "regression" and traits.noise != "homoscedastic":
            raise ValueError(f"noise={traits.noise!r} applies to regression, not {task}")
        if task != "regression" and traits.ggn:
            raise ValueError("curvature='ggn' is the Gauss-Newton curvature of a regression likelihood")
        self.traits, self.task, self.samples, self.name = traits, task, int(samples), name
        #: the layer prior in effect (``traits.prior`` resolved for the task)
        self.prior = traits.prior_for(task)
        if isinstance(model, torch.nn.Module):
            _check_model(model, traits, name)
            nets = [model] + [_reinitialise(copy.deepcopy(model)) for _ in range(traits.members - 1)]
        elif callable(model):
            nets = [model(traits.gaussian, traits.dropout) for _ in range(traits.members)]
        else:
            raise TypeError(
                "model must be a torch.nn.Module or a builder build(bayes, dropout=0.0) -> module"
            )
        if traits.gaussian:
            for net in nets:
                set_prior(net, self.prior)
                if traits.sampling:
                    set_propagation(net, traits.propagation)
        self.members = torch.nn.ModuleList(nets)
        self.likelihoods: torch.nn.ModuleList | None = None
        if task == "regression":
            self.likelihoods = torch.nn.ModuleList(_likelihood(traits, noise_var, learn_noise) for _ in nets)
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------ views
    @property
    def net(self) -> torch.nn.Module:
        """The first (or only) network."""
        return self.members[0]

    @property
    def likelihood(self) -> torch.nn.Module | None:
        """The first network's likelihood (regression: :class:`~dualflow.losses.GaussianLikelihood`
        or :class:`~dualflow.losses.HeteroscedasticLikelihood`), ``None`` for classification."""
        return None if self.likelihoods is None else self.likelihoods[0]

    @property
    def noise_var(self) -> Tensor | None:
        """Observation noise variance ``tau^2`` (the members' mean), ``None`` for classification."""
        if self.likelihoods is None:
            return None
        if len(self.likelihoods) == 1:
            return self.likelihoods[0].noise_var.detach()
        return torch.stack([lik.noise_var.detach() for lik in self.likelihoods]).mean()

    @property
    def is_fitted(self) -> bool:
        """``True`` after a finished :meth:`fit` (kept in the ``fitted`` buffer, so a
        ``state_dict`` of a fitted method carries it)."""
        return bool(self.fitted)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, task={self.task!r}, traits=({self.traits.summary()})"

    # ------------------------------------------------------------------ training
    def training_outputs(self, x: Any) -> list[list[Any]]:
        """The training forward passes of one mini-batch: ``outputs[k][s]`` is pass ``s``
        (of ``traits.train_samples``) of member ``k``, under the training propagation.

        With the Gauss-Newton curvature (``traits.ggn``) the natural-gradient optimizer of the
        running :meth:`fit` is handed the likelihoods' curvature surrogate of these outputs
        (:meth:`dualflow.optim.NaturalGradient.set_curvature`) before the loss is
        differentiated."""
        s = self.traits.train_samples
        outputs = [[net(x) for _ in range(s)] for net in self.members]
        ref = self.__dict__.get("_curvature_opt")
        opt = ref() if ref is not None else None
        if opt is not None and self.likelihoods is not None and torch.is_grad_enabled():
            # each member's weights reach only its own surrogate: one sum serves them all
            surrogate = sum(self.likelihoods[k].ggn_surrogate(p[0]) for k, p in enumerate(outputs))
            opt.set_curvature(surrogate)  # type: ignore[arg-type]
        return outputs

    def loss(self, outputs: Any, targets: Tensor) -> Tensor:
        """The data term ``mean_batch J`` (no KL): the sum over members of the mean over each
        member's passes of ``J`` (regression: the member's Gaussian NLL, ``traits.objective``;
        classification: :func:`~dualflow.losses.categorical_nll`).

        Args:
            outputs: :meth:`training_outputs` of a batch, or one network output (member 0).
            targets: regression ``(B, D)`` (or ``(B,)`` for ``D = 1``); labels ``(B,)``.
        """
        if not isinstance(outputs, list):
            outputs = [[outputs]]
        total: Tensor | None = None
        for k, passes in enumerate(outputs):
            j = self._nll(k, passes[0], targets)
            for out in passes[1:]:
                j = j + self._nll(k, out, targets)
            if len(passes) > 1:
                j = j / len(passes)
            total = j if total is None else total + j
        assert total is not None, "no outputs"
        return total

    def _nll(self, k: int, out: Any, y: Tensor) -> Tensor:
        if self.likelihoods is not None:
            return self.likelihoods[k](out, y)
        return losses.categorical_nll(out, y)

    def kl(self) -> Tensor:
        """``KL(q || p)`` of all members' Gaussian weights (0 for point methods)."""
        return model_kl(self)

    def objective(self, kl_weight: float) -> Objective:
        """The step's objective ``loss(training_outputs(x), y) + kl_weight KL`` as the module
        the loop trains (:class:`dualflow.train.Objective`)."""
        return Objective(self, self.loss, kl_weight, forward=self.training_outputs)

    def configure_optimizer(
        self, params: list[Any], data_size: int, config: TrainConfig
    ) -> torch.optim.Optimizer:
        """The optimizer of :meth:`fit`: ``traits.optimizer(params, self, data_size, config)``
        (with ``traits.ggn``, :meth:`training_outputs` hands it the Gauss-Newton curvature)."""
        opt = self.traits.optimizer(params, self, data_size, config)
        if self.traits.ggn:
            self.__dict__["_curvature_opt"] = weakref.ref(opt)  # not a submodule, not in state_dict
        return opt

    def fit(
        self,
        train_data: Any,
        config: TrainConfig | None = None,
        eval_fn: Callable[[Method], dict[str, float]] | None = None,
        *,
        data_size: int | None = None,
        **fit_kwargs: Any,
    ) -> History:
        """Train with :func:`dualflow.train.fit` (the one loop).

        Args:
            train_data: ``(inputs, targets)``, a ``Dataset`` or a loader; regression targets
                ``(B, D)`` (or ``(B,)``), classification integer labels ``(B,)``.
            config: :class:`~dualflow.train.TrainConfig` (epochs, batch size, lr, seed, ...).
                Natural-gradient methods use ``config.lr`` for their point parameters only.
            eval_fn: called with this method at every epoch end (eval mode, no grad).
            data_size: ``N`` given to the optimizer factory (natural gradient's data size;
                default: the number of training examples).
            fit_kwargs: further keyword arguments of :func:`dualflow.train.fit` (``transform``,
                ``metrics``, ``callbacks``, ``parallel``, ``meta``, ``scheduler``, ``device``,
                ``optimizer`` to replace the traits' factory).

        Returns:
            :class:`~dualflow.train.History`. :attr:`is_fitted` is ``True`` after a run that
            was not stopped early. The global RNG states are as before the call.
        """
        cfg = config or TrainConfig()
        n = data_size if data_size is not None else _data_size(train_data)
        if "optimizer" not in fit_kwargs:
            fit_kwargs["optimizer"] = lambda params: self.configure_optimizer(params, n, cfg)
        self.__dict__.pop("_curvature_opt", None)  # set again by configure_optimizer
        try:
            hist = train_fit(
                self, self.loss, train_data, cfg, forward=self.training_outputs, eval_fn=eval_fn, **fit_kwargs
            )
        finally:
            self.__dict__.pop("_curvature_opt", None)
        if not hist.stopped:
            self.fitted.fill_(True)
        return hist

    # ------------------------------------------------------------------ prediction
    def forward(self, x: Any) -> Gaussian | Tensor:
        """Alias of :meth:`predictive`."""
        return self.predictive(x)

    def _passes(self, x: Any, samples: int, mode: str) -> list[tuple[Any, int]]:
        """``[(output, member index), ...]`` whose mixture is the predictive."""
        t = self.traits
        random = (t.gaussian and mode != "moments") or t.mc_dropout
        s = samples if random else 1
        out = []
        for k, net in enumerate(self.members):
            with ExitStack() as stack:
                if t.gaussian:
                    stack.enter_context(propagation(net, mode))
                if t.mc_dropout:
                    stack.enter_context(mc_dropout(net))
                out += [(net(x), k) for _ in range(s)]
        return out

    def predictive(
        self, x: Any, *, samples: int | None = None, propagation: str | None = None, noise: bool = True
    ) -> Gaussian | Tensor:
        """The predictive distribution of ``y`` given inputs ``x``, differentiable with respect
        to ``x`` and the parameters, in whatever train/eval mode the module is.

        Args:
            x: inputs ``(B, ...)``.
            samples: ``S`` passes of a sampled predictive (default ``self.samples``).
            propagation: evaluate the Gaussian layers under this mode (one of
                :data:`~dualflow.nn.base.PROPAGATIONS`) instead of ``traits.propagation``:
                ``"moments"`` is one deterministic pass, a sampling mode ``S`` passes. Point
                networks ignore it.
            noise: regression: include the observation noise ``tau^2`` in the variance
                (the predictive of ``y``; ``False``: of the network output ``f(x)`` only).

        Returns:
            regression: :class:`~dualflow.Gaussian`, mean/variance ``(B, D)``;
            classification: probabilities ``(B, C)``.
        """
        mode = propagation or self.traits.propagation
        if mode not in PROPAGATIONS:
            raise ValueError(f"unknown propagation {mode!r}; known: {list(PROPAGATIONS)}")
        s = self.samples if samples is None else int(samples)
        if s < 1:
            raise ValueError(f"samples must be >= 1, got {s}")
        if not noise and self.task != "regression":
            raise ValueError("noise=False applies to regression (class probabilities have no noise term)")
        passes = self._passes(x, s, mode)
        if self.task == "classification":
            probs = [losses.predictive_probs(out) for out, _ in passes]
            return probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)
        assert self.likelihoods is not None
        if self.traits.noise == "heteroscedastic":  # per-input noise: E[tau^2(x)] of each pass
            parts = [
                losses.heteroscedastic_moments(
                    out, self.likelihoods[k].offset, self.likelihoods[k].min_noise_var
                )
                for out, k in passes
            ]
            gs = [f for f, _, _ in parts]
            nvs: list[Any] = [e_tau2 if noise else 0.0 for _, e_tau2, _ in parts]
        else:
            gs = [as_gaussian(out) for out, _ in passes]
            nvs = [self.likelihoods[k].noise_var if noise else 0.0 for _, k in passes]
        if len(gs) == 1:
            return Gaussian(gs[0].mean, gs[0].var + nvs[0])
        means = torch.stack([g.mean for g in gs])
        mean = means.mean(0)
        inner = torch.stack([g.var + nv for g, nv in zip(gs, nvs)]).mean(0)
        return Gaussian(mean, inner + ((means - mean) ** 2).mean(0))

    @torch.no_grad()
    def predict(
        self,
        x: Tensor,
        *,
        samples: int | None = None,
        propagation: str | None = None,
        batch_size: int = 1024,
        noise: bool = True,
    ) -> Gaussian | Tensor:
        """:meth:`predictive` in eval mode, without gradients, in batches of ``batch_size``.

        Regression: the variance *includes* the observation noise ``tau^2`` (``noise=False``:
        the network output's variance alone, what :func:`dualflow.train.predict` of ``.net``
        returns). See :meth:`predictive` for the other arguments.
        """
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        try:
            outs = [
                self.predictive(
                    x[i : i + batch_size].to(dev), samples=samples, propagation=propagation, noise=noise
                )
                for i in range(0, x.shape[0], batch_size)
            ]
        finally:
            self.train(was)
        if self.task == "classification":
            return torch.cat(outs)
        return Gaussian(torch.cat([o.mean for o in outs]), torch.cat([o.var for o in outs]))

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, **predict_kwargs: Any) -> dict[str, float]:
        """Test metrics: ``nll`` (mean negative log predictive density / probability) and
        ``rmse`` (regression) or ``accuracy`` (classification)."""
        p = self.predict(x, **predict_kwargs)
        y = y.to(p.device if isinstance(p, Tensor) else p.mean.device)
        if self.task == "classification":
            lp = torch.log(p.gather(1, y.long().unsqueeze(1)).clamp_min(1e-38)).squeeze(1)
            return {"nll": float(-lp.mean()), "accuracy": float((p.argmax(1) == y).float().mean())}
        ll = losses.gaussian_log_density(p, y)
        t = y.unsqueeze(1) if y.dim() == 1 and p.mean.dim() == 2 else y
        return {"nll": float(-ll.mean()), "rmse": float(((p.mean - t) ** 2).mean().sqrt())}


def _likelihood(traits: Traits, noise_var: float, learn_noise: bool) -> torch.nn.Module:
    """One member's regression likelihood for ``traits.noise`` and ``traits.objective``."""
    if traits.noise == "heteroscedastic":
        return losses.HeteroscedasticLikelihood(noise_var=noise_var, objective=traits.objective)  # type: ignore[arg-type]
    return losses.GaussianLikelihood(
        noise_var=noise_var,
        learn=learn_noise,
        objective=traits.objective,  # type: ignore[arg-type]
        empirical=traits.noise == "empirical",
    )


def _data_size(data: Any) -> int:
    n = _examples(data)
    if n is None:
        raise ValueError("Method.fit: this loader does not say how many examples it has: pass data_size=")
    return n
