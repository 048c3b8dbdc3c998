"""Runners of the paper's Figures 2-4: the joint (observation, label) distribution of trained
networks, sampled by NUTS (:func:`dualflow.joint.sample_joint`).

* :func:`run_boston` (Figure 2): Boston housing, standard split 0, standardised; a BNN trained
  by ``bp``, two independently trained point networks (``vanilla``, two seeds) and a deep
  ensemble; panels (a) predicted vs sampled label and (b) the sampled observations on the two
  principal components of the training inputs with 1/2/3-sigma regions and the prediction's
  contour lines.
* :func:`run_mixture` (Figure 3): a 2-D Gaussian mixture (fixed seed); a 3-hidden-layer BNN
  trained by ``bp`` to classify the component; the density of ``x`` it induces per class and
  in total (HMC histogram and the exact density on a grid) beside the true mixture.
* :func:`run_images` (Figure 4): images sampled by NUTS on the input of a Bayesian conv net,
  conditioned on each class (MNIST and a small DenseNet-BC by default).

Every runner trains (or reloads from ``workdir``) its networks with fixed seeds, samples (chains
are cached in ``workdir`` too, so a rerun resumes), and returns a JSON-able record and writes
one PNG. Plotting imports matplotlib lazily.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

import dualflow as df
import dualflow.methods as dm
from dualflow import joint as dj
from dualflow.train import TrainConfig, seed_everything

__all__ = [
    "BOSTON_RECIPE",
    "FIGURES",
    "IMAGES_RECIPE",
    "MIXTURE",
    "JointOptions",
    "run_boston",
    "run_images",
    "run_mixture",
    "sampled_stats",
]


@dataclass
class JointOptions:
    """Settings shared by the figures (the CLI's options).

    Attributes:
        out_dir: where ``fig*_<name>.png`` and ``.json`` go.
        workdir: cache of trained networks and finished chains (``None``: no cache).
        seed: base seed (training and chains).
        chains, warmup, samples: per chain set (``None``: the figure's default).
        energies: which energies to sample (:data:`dualflow.joint.ENERGIES`).
        device: ``cpu`` or ``cuda``.
        data_dir: data root (``None``: ``$DUALFLOW_DATA`` / defaults).
        progress: Pyro's progress bars.
        extra: figure-specific options (images: dataset, arch, ...).
    """

    out_dir: str = "results/figures"
    workdir: str | None = "runs/joint"
    seed: int = 0
    chains: int = 4
    warmup: int | None = None
    samples: int | None = None
    energies: tuple[str, ...] = ("predictive", "expected")
    device: str = "cpu"
    data_dir: str | None = None
    progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def versions() -> dict[str, str]:
    import pyro

    return {
        "dualflow": df.__version__,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


#: version of ``Method.state_dict``'s layout in the cache key: a network cached by code with
#: another layout (the pre-``Traits`` methods kept ``net.*``, not ``members.0.*``) is retrained,
#: never half-loaded
_STATE_LAYOUT = 2


def _model_path(workdir: str, key: dict[str, Any]) -> str:
    return os.path.join(workdir, f"model_{key['name']}_{_digest(key | {'state_layout': _STATE_LAYOUT})}.pt")


def _fit_cached(
    method: dm.Method,
    data: tuple[Tensor, Tensor],
    cfg: TrainConfig,
    key: dict[str, Any],
    workdir: str | None,
    log: Callable[[str], None],
    device: str = "cpu",
) -> dict[str, Any]:
    """Train ``method`` (or load its fitted state from ``workdir``); returns timing info."""
    path = None
    if workdir is not None:
        path = _model_path(workdir, key)
        if os.path.isfile(path):
            method.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            method.to(device)
            log(f"  {key['name']}: loaded the trained network from {path}")
            return {"train_seconds": None, "loaded_from": path}
    t0 = time.perf_counter()
    ck = None if path is None else path + ".ckpt"
    cfg = TrainConfig(**{**asdict(cfg), "checkpoint": ck, "checkpoint_every": cfg.checkpoint_every or 200})
    method.fit(data, cfg, device=device)
    secs = time.perf_counter() - t0
    if path is not None:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        torch.save(method.state_dict(), tmp)
        os.replace(tmp, path)
        if ck is not None and os.path.isfile(ck):
            os.remove(ck)
    log(f"  {key['name']}: trained in {secs:.1f}s")
    return {"train_seconds": secs, "loaded_from": None}


def _chain_cache(opts: JointOptions, name: str) -> str | None:
    return None if opts.workdir is None else os.path.join(opts.workdir, "chains", name)


def _log_result(log: Callable[[str], None], what: str, res: dj.JointSamples) -> None:
    flag = "" if res.converged else f"  NOT CONVERGED: {len(res.not_converged())} dims > {dj.RHAT_THRESHOLD}"
    log(
        f"  {what}: max split R-hat {res.max_rhat:.3f}, min ESS {res.min_ess:.0f}, "
        f"median ESS {float(res.ess.median()):.0f}{flag}"
    )


# ============================================================================ Figure 2: Boston

#: The networks of Figure 2 (standardised inputs and targets, split 0 of the standard splits).
BOSTON_RECIPE: dict[str, Any] = {
    "dataset": "boston",
    "split": 0,
    "hidden": [50],
    "activation": "relu (closed-form moments)",
    "epochs": 1200,  # full-batch steps (the UCI protocol's "small set" schedule)
    "noise_var": 0.1,
    "methods": {
        "bp": {"lr": 3e-2, "weight_decay": 0.0},
        "vanilla": {"lr": 1e-2, "weight_decay": 1e-4},
        "ensemble": {"lr": 1e-2, "weight_decay": 1e-4, "ensemble_size": 5},
    },
    "chains": {"warmup": 300, "samples": 500, "max_tree_depth": 8, "init_noise": 0.1},
}


def _boston_data(data_dir: str | None) -> dict[str, Any]:
    from dualflow.experiments.data.uci import Standardizer, load_uci

    ds = load_uci(BOSTON_RECIPE["dataset"], data_dir)
    xtr, ytr, xte, yte = ds.split(BOSTON_RECIPE["split"])
    xs, ys = Standardizer.fit(xtr), Standardizer.fit(ytr)

    def t(a: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float32))

    return {
        "x": t(xs.transform(xtr)),
        "y": t(ys.transform(ytr)).reshape(-1, 1),
        "x_test": t(xs.transform(xte)),
        "y_test": t(ys.transform(yte)).reshape(-1, 1),
        "y_mean": float(ys.mean),
        "y_std": float(ys.std),
        "source": str(ds.path),
    }


def _boston_method(name: str, d_in: int, seed: int) -> tuple[dm.Method, TrainConfig]:
    r = BOSTON_RECIPE["methods"][name]
    build = dm.mlp_builder(d_in, BOSTON_RECIPE["hidden"], 1)
    seed_everything(seed)  # the initial weights
    kw: dict[str, Any] = {"noise_var": BOSTON_RECIPE["noise_var"], "learn_noise": True}
    if name == "ensemble":
        kw["ensemble_size"] = r["ensemble_size"]
    m = dm.create(name, build, task="regression", **kw)
    cfg = TrainConfig(
        epochs=BOSTON_RECIPE["epochs"],
        batch_size=10**9,  # full batch (clipped to N)
        lr=r["lr"],
        weight_decay=r["weight_decay"],
        schedule="cosine",
        seed=seed,
        progress=False,
    )
    return m, cfg


def _test_metrics(m: dm.Method, x: Tensor, y: Tensor, y_std: float) -> dict[str, float]:
    p = m.predict(x)
    rmse = float(((p.mean - y) ** 2).mean().sqrt()) * y_std
    ll = float((-0.5 * torch.log(2 * math.pi * p.var) - 0.5 * (y - p.mean) ** 2 / p.var).mean()) - math.log(
        y_std
    )
    return {"test_rmse": rmse, "test_ll": ll}


def sampled_stats(m: dm.Method, res: dj.JointSamples, base: dj.GaussianBase, y_std: float) -> dict[str, Any]:
    """Reading aids of a regression chain set (original label units where stated)."""
    x = res.x.reshape(-1, res.x.shape[-1])
    y = res.y.reshape(-1, 1)
    p = m.predict(x)
    z = (y - p.mean) / p.var.sqrt()
    d2 = (base.whiten(x) ** 2).sum(1)
    return {
        "corr_label_prediction": float(torch.corrcoef(torch.stack([y[:, 0], p.mean[:, 0]]))[0, 1]),
        "rms_label_minus_prediction": float(((y - p.mean) ** 2).mean().sqrt()) * y_std,
        "mean_predictive_sd": float(p.var.sqrt().mean()) * y_std,
        "mean_epistemic_sd": float((p.var - m.noise_var).clamp_min(0).sqrt().mean()) * y_std,
        "noise_sd": float(m.noise_var.sqrt()) * y_std,
        "fraction_within_1_2_3_sd": [float((z.abs() < k).float().mean()) for k in (1, 2, 3)],
        "mean_mahalanobis_sq_under_base": float(d2.mean()),
        "base_dimension": base.dim,
    }


def run_boston(opts: JointOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Figure 2 (see the module docstring). Returns the record; writes ``fig2_boston.{png,json}``."""
    t_start = time.perf_counter()
    data = _boston_data(opts.data_dir)
    x, y = data["x"], data["y"]
    n, d = x.shape
    rc = BOSTON_RECIPE["chains"]
    warmup = opts.warmup if opts.warmup is not None else rc["warmup"]
    samples = opts.samples if opts.samples is not None else rc["samples"]
    log(f"boston split {BOSTON_RECIPE['split']}: {n} training pairs, {d} features (standardised)")
    base = dj.GaussianBase.fit(x)

    # networks ---------------------------------------------------------------------------
    nets: dict[str, dm.Method] = {}
    train_info: dict[str, Any] = {}
    for key, (name, seed) in {
        "bp": ("bp", opts.seed),
        "vanilla_a": ("vanilla", opts.seed),
        "vanilla_b": ("vanilla", opts.seed + 1),
        "ensemble": ("ensemble", opts.seed),
    }.items():
        m, cfg = _boston_method(name, d, seed)
        spec = {"name": key, "method": name, "seed": seed, "recipe": BOSTON_RECIPE, "data": data["source"]}
        info = _fit_cached(m, (x, y), cfg, spec, opts.workdir, log)
        nets[key] = m
        train_info[key] = (
            info
            | {"method": name, "seed": seed}
            | _test_metrics(m, data["x_test"], data["y_test"], data["y_std"])
        )
        ti = train_info[key]
        log(
            f"  {key}: test RMSE {ti['test_rmse']:.2f}, test LL {ti['test_ll']:.2f} "
            f"(split {BOSTON_RECIPE['split']}, original units)"
        )

    # chains -----------------------------------------------------------------------------
    runs: list[tuple[str, str, str]] = [("bp", "bp", e) for e in opts.energies]
    runs += [("vanilla_a", "vanilla_a", "predictive"), ("vanilla_b", "vanilla_b", "predictive")]
    runs += [("ensemble", "ensemble", "predictive")]
    names = [f"x[{i}]" for i in range(d)]
    chain_sets: dict[str, dj.JointSamples] = {}
    records: dict[str, Any] = {}
    for key, net_key, energy in runs:
        rid = f"{key}/{energy}"
        t0 = time.perf_counter()
        log(f"sampling {rid}: {opts.chains} chains x ({warmup} warm-up + {samples}) NUTS")
        res = dj.sample_joint(
            nets[net_key],
            x,
            y,
            base=base,
            energy=energy,
            chains=opts.chains,
            warmup=warmup,
            samples=samples,
            max_tree_depth=rc["max_tree_depth"],
            init_noise=rc["init_noise"],
            seed=opts.seed,
            names=names,
            cache_dir=_chain_cache(opts, f"boston_{rid.replace('/', '_')}"),
            progress=opts.progress,
            log=lambda s: log("    " + s),
        )
        _log_result(log, rid, res)
        chain_sets[rid] = res
        records[rid] = res.summary() | {
            "seconds": time.perf_counter() - t0,
            "model": net_key,
            "reading": sampled_stats(nets[net_key], res, base, data["y_std"]),
        }

    # the two point networks at the same observations ----------------------------------
    fa, fb = nets["vanilla_a"], nets["vanilla_b"]
    pooled = torch.cat([chain_sets["vanilla_a/predictive"].x, chain_sets["vanilla_b/predictive"].x]).reshape(
        -1, d
    )

    def disagreement(xq: Tensor) -> float:
        return float(((fa.predict(xq).mean - fb.predict(xq).mean) ** 2).mean().sqrt()) * data["y_std"]

    pair = {
        "rms_prediction_difference_at_sampled_x": disagreement(pooled),
        "rms_prediction_difference_at_training_x": disagreement(x),
        "rms_prediction_difference_at_test_x": disagreement(data["x_test"]),
    }
    log(
        "  point pair: RMS |f_a - f_b| at sampled x {:.2f}, training x {:.2f}, test x {:.2f}".format(
            *pair.values()
        )
    )
    os.makedirs(opts.out_dir, exist_ok=True)
    png = os.path.join(opts.out_dir, "fig2_boston.png")
    plot_boston(nets, chain_sets, data, opts.energies, png)
    record = {
        "figure": "2",
        "what": "joint (x, y) of networks trained on Boston housing, sampled by NUTS",
        "target": "pi(x, y) ~ p0(x) exp(-J(x, y)), p0 = Gaussian fitted to the standardised training inputs",
        "recipe": BOSTON_RECIPE,
        "data": {"source": data["source"], "n_train": n, "n_test": int(data["x_test"].shape[0])},
        "networks": train_info,
        "chain_sets": records,
        "point_pair": pair,
        "all_converged": all(r.converged for r in chain_sets.values()),
        "png": png,
        "seconds": time.perf_counter() - t_start,
    }
    return record


def _ellipse(ax: Any, pts: np.ndarray, **kw: Any) -> None:
    mu = pts.mean(0)
    cov = np.cov(pts.T)
    vals, vecs = np.linalg.eigh(cov)
    t = np.linspace(0, 2 * np.pi, 200)
    circle = np.stack([np.cos(t), np.sin(t)])
    for k in (1, 2, 3):
        e = (vecs @ (np.sqrt(vals)[:, None] * circle * k)).T + mu
        ax.plot(
            e[:, 0],
            e[:, 1],
            ":",
            color="tab:blue",
            lw=1.2,
            **({"label": "1/2/3-sigma"} if k == 1 else {}),
            **kw,
        )


def plot_boston(
    nets: dict[str, dm.Method],
    sets: dict[str, dj.JointSamples],
    data: dict[str, Any],
    energies: tuple[str, ...],
    path: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, ym, ys = data["x"], data["y_mean"], data["y_std"]
    _, s, vt = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    pcs = vt[:2].T  # (D, 2)
    xm = x.mean(0)
    explained = (s[:2] ** 2 / (s**2).sum()).tolist()

    def proj(a: Tensor) -> np.ndarray:
        return ((a - xm) @ pcs).numpy()

    rows: list[tuple[str, list[tuple[str, str]]]] = []
    for e in energies:
        label = (
            "BNN (bp), J = -log p(y|x)"
            if e == "predictive"
            else "BNN (bp), J = E_q[-log p(y|x,W)] (Eq. 2 literal)"
        )
        rows.append((label, [(f"bp/{e}", "bp")]))
    rows.append(
        (
            "two point networks (vanilla, seeds a, b)",
            [("vanilla_a/predictive", "vanilla_a"), ("vanilla_b/predictive", "vanilla_b")],
        )
    )
    rows.append(("deep ensemble (5 point networks)", [("ensemble/predictive", "ensemble")]))
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4.6 * len(rows)))
    colors = ["tab:red", "tab:orange"]
    # a common PC window
    allp = np.concatenate([proj(sets[k].x.reshape(-1, x.shape[1])) for _, ks in rows for k, _ in ks])
    lo, hi = np.percentile(allp, 0.5, axis=0), np.percentile(allp, 99.5, axis=0)
    ga, gb = np.meshgrid(np.linspace(lo[0], hi[0], 80), np.linspace(lo[1], hi[1], 80))
    grid = torch.as_tensor(np.stack([ga.ravel(), gb.ravel()], 1), dtype=torch.float32) @ pcs.T + xm
    ytr = (data["y"][:, 0] * ys + ym).numpy()
    letters = "abcdefghijklmnop"
    for r, (title, items) in enumerate(rows):
        ax_a, ax_b = axes[r]
        ptr = nets[items[0][1]].predict(x).mean[:, 0] * ys + ym
        ax_a.scatter(ytr, ptr.numpy(), s=6, c="0.6", label="training pairs")
        for i, (k, nk) in enumerate(items):
            res = sets[k]
            xs = res.x.reshape(-1, x.shape[1])
            yl = res.y.reshape(-1).numpy() * ys + ym
            pred = nets[nk].predict(xs)
            pm = pred.mean[:, 0].numpy() * ys + ym
            lab = f"HMC draws ({nk})" if len(items) > 1 else "HMC draws"
            ax_a.scatter(yl, pm, s=3, alpha=0.35, color=colors[i], label=lab)
            pp = proj(xs)
            sc = ax_b.scatter(pp[:, 0], pp[:, 1], s=3, alpha=0.5, c=pm, cmap="viridis", vmin=5, vmax=50)
            if i == 0:
                _ellipse(ax_b, pp)
            gpred = nets[nk].predict(grid).mean[:, 0].numpy().reshape(ga.shape) * ys + ym
            cs = ax_b.contour(
                ga,
                gb,
                gpred,
                levels=[10, 15, 20, 25, 30, 35, 40],
                colors="k",
                linestyles="solid" if i == 0 else "dashed",
                linewidths=0.9,
            )
            ax_b.clabel(cs, fontsize=7, fmt="%g")
            if len(items) > 1 and i == 0:  # the other network's prediction at these draws
                other = nets[items[1][1]].predict(xs).mean[:, 0].numpy() * ys + ym
                ax_a.scatter(
                    yl,
                    other,
                    s=3,
                    alpha=0.35,
                    color="tab:blue",
                    label=f"{items[1][1]}'s prediction at {nk}'s draws",
                )
            rh = max(sets[k].max_rhat for k, _ in items)
            es = min(sets[k].min_ess for k, _ in items)
        lim = [min(ytr.min(), 0), max(ytr.max(), 55)]
        ax_a.plot(lim, lim, "k-", lw=0.8)
        ax_a.set_xlim(lim)
        ax_a.set_ylim(lim)
        ax_a.set_xlabel("label y of the sampled pair (MEDV, $1000)")
        ax_a.set_ylabel("prediction E[y | x] at the sampled x")
        ax_a.set_title(f"({letters[2 * r]}) {title}\nmax R-hat {rh:.3f}, min ESS {es:.0f}", fontsize=9)
        ax_a.legend(fontsize=7, markerscale=3, loc="upper left")
        pt = proj(x)
        ax_b.scatter(pt[:, 0], pt[:, 1], s=4, c="0.75", marker="x", label="training inputs", zorder=0)
        ax_b.set_xlim(lo[0], hi[0])
        ax_b.set_ylim(lo[1], hi[1])
        ax_b.set_xlabel(f"PC 1 ({explained[0]:.0%} of the variance)")
        ax_b.set_ylabel(f"PC 2 ({explained[1]:.0%})")
        ax_b.set_title(
            f"({letters[2 * r + 1]}) sampled x on the principal components; black: prediction contours"
            + (" (solid a, dashed b)" if len(items) > 1 else ""),
            fontsize=9,
        )
        ax_b.legend(fontsize=7, loc="upper right")
        fig.colorbar(sc, ax=ax_b, label="prediction (MEDV)")
    fig.suptitle(
        "Figure 2: joint (x, y) of networks trained on Boston housing (split 0), NUTS draws", fontsize=11
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ Figure 3: mixture

#: The Gaussian mixture of Figure 3 (fixed; its own seed) and the classifier's recipe.
MIXTURE: dict[str, Any] = {
    "data_seed": 2023,
    "means": [[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0]],
    "weights": [0.3, 0.3, 0.4],
    "n_train": 600,
    "n_test": 4000,
    "hidden": [32, 32, 32],
    "epochs": 300,
    "batch_size": 100,
    "lr": 1e-2,
    "draws": 32,
    "grid": 160,
    "chains": {"warmup": 200, "samples": 400, "max_tree_depth": 8, "init_noise": 0.1},
}


def mixture_params() -> tuple[Tensor, Tensor, Tensor]:
    """``(means (K, 2), covariances (K, 2, 2), weights (K,))`` of the fixed mixture."""
    g = torch.Generator().manual_seed(MIXTURE["data_seed"])
    means = torch.tensor(MIXTURE["means"])
    covs = []
    for _ in range(means.shape[0]):
        a = torch.randn(2, 2, generator=g) * 0.5
        covs.append(a @ a.T + 0.3 * torch.eye(2))
    return means, torch.stack(covs), torch.tensor(MIXTURE["weights"])


def mixture_sample(n: int, seed: int) -> tuple[Tensor, Tensor]:
    means, covs, w = mixture_params()
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(w, n, replacement=True, generator=g)
    eps = torch.randn(n, 2, generator=g)
    x = means[k] + torch.einsum("nij,nj->ni", torch.linalg.cholesky(covs)[k], eps)
    return x, k


def mixture_log_density(x: Tensor) -> Tensor:
    """``log w_k N(x; mu_k, S_k)`` ``(B, K)``."""
    means, covs, w = mixture_params()
    comp = torch.distributions.MultivariateNormal(means, covs)
    return comp.log_prob(x.unsqueeze(1)) + w.log()


def _tv(samples: np.ndarray, density: np.ndarray, edges: tuple[np.ndarray, np.ndarray]) -> float:
    h, _, _ = np.histogram2d(samples[:, 0], samples[:, 1], bins=edges)
    h = h / max(h.sum(), 1)
    return 0.5 * float(np.abs(h - density).sum())


def run_mixture(opts: JointOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Figure 3 (see the module docstring). Returns the record; writes ``fig3_mixture.png``."""
    t_start = time.perf_counter()
    mx = MIXTURE
    rc = mx["chains"]
    warmup = opts.warmup if opts.warmup is not None else rc["warmup"]
    samples = opts.samples if opts.samples is not None else rc["samples"]
    x, y = mixture_sample(mx["n_train"], mx["data_seed"])
    xt, yt = mixture_sample(mx["n_test"], mx["data_seed"] + 1)
    k_cls = len(mx["weights"])
    build = dm.mlp_builder(2, mx["hidden"], k_cls)
    seed_everything(opts.seed)
    m = dm.create("bp", build, task="classification")
    cfg = TrainConfig(
        epochs=mx["epochs"], batch_size=mx["batch_size"], lr=mx["lr"], seed=opts.seed, progress=False
    )
    info = _fit_cached(
        m, (x, y), cfg, {"name": "mixture_bp", "seed": opts.seed, "mixture": mx}, opts.workdir, log
    )
    acc = float((m.predict(xt).argmax(1) == yt).float().mean())
    bayes_acc = float((mixture_log_density(xt).argmax(1) == yt).float().mean())
    log(f"  test accuracy {acc:.3f} (Bayes-optimal classifier: {bayes_acc:.3f})")
    base = dj.GaussianBase.fit(x)

    # exact induced densities on a grid (2-D: the normaliser is a sum) -----------------
    lo = x.min(0).values - 1.5
    hi = x.max(0).values + 1.5
    ng = mx["grid"]
    gx = torch.linspace(float(lo[0]), float(hi[0]), ng)
    gy = torch.linspace(float(lo[1]), float(hi[1]), ng)
    gxx, gyy = torch.meshgrid(gx, gy, indexing="xy")
    grid = torch.stack([gxx.reshape(-1), gyy.reshape(-1)], 1)
    bins = 16  # coarse: the total variation of a few hundred effective draws is then ~0.1
    edges = (
        np.linspace(float(lo[0]), float(hi[0]), bins + 1),
        np.linspace(float(lo[1]), float(hi[1]), bins + 1),
    )
    coarse = ng // bins

    def to_bins(p: Tensor) -> np.ndarray:  # grid-cell masses -> coarse bins
        a = p.reshape(ng, ng).numpy()  # rows: y, cols: x
        return a.reshape(bins, coarse, bins, coarse).sum((1, 3)).T  # (x-bins, y-bins) like histogram2d

    true_log = mixture_log_density(grid)
    panels: dict[str, Any] = {"true": {}}
    for k in range(k_cls):
        panels["true"][k] = torch.softmax(true_log[:, k], 0)
    panels["true"]["total"] = torch.softmax(torch.logsumexp(true_log, 1), 0)

    records: dict[str, Any] = {}
    chain_sets: dict[str, dj.JointSamples] = {}
    for energy in opts.energies:
        en = dj.JointEnergy(m, base, x_shape=(2,), energy=energy, draws=mx["draws"], noise_seed=opts.seed)
        m.eval()
        with torch.no_grad():
            # one row at a time when the energy uses a fixed random stream (as the chains do)
            if energy == "expected":
                j = torch.cat([en.class_losses(grid[i : i + 1]) for i in range(grid.shape[0])])
            else:
                j = en.class_losses(grid)
            lb = base.log_prob(grid)
        panels[energy] = {k: torch.softmax(lb - j[:, k], 0) for k in range(k_cls)}
        panels[energy]["total"] = torch.softmax(lb + torch.logsumexp(-j, 1), 0)
        for label in [*range(k_cls), None]:
            tag = "total" if label is None else label
            rid = f"{energy}/{'x' if label is None else f'x|y={label}'}"
            t0 = time.perf_counter()
            log(f"sampling {rid}: {opts.chains} chains x ({warmup} + {samples}) NUTS")
            res = dj.sample_joint(
                m,
                x,
                y,
                base=base,
                energy=energy,
                label=label,
                chains=opts.chains,
                warmup=warmup,
                samples=samples,
                max_tree_depth=rc["max_tree_depth"],
                init_noise=rc["init_noise"],
                draws=mx["draws"],
                seed=opts.seed,
                cache_dir=_chain_cache(opts, f"mixture_{energy}_{tag}"),
                progress=opts.progress,
                log=lambda s: log("    " + s),
            )
            _log_result(log, rid, res)
            chain_sets[rid] = res
            pts = res.x.reshape(-1, 2).numpy()
            exact = to_bins(panels[energy][tag])
            # the total variation an exact sample of the same effective size would show
            gi = torch.Generator().manual_seed(opts.seed + 17)
            n_ref = max(10, int(res.min_ess))
            idx = torch.multinomial(panels[energy][tag], n_ref, replacement=True, generator=gi)
            ref = grid[idx].numpy() + (torch.rand(n_ref, 2, generator=gi).numpy() - 0.5) * np.array(
                [float(gx[1] - gx[0]), float(gy[1] - gy[0])]
            )
            records[rid] = res.summary() | {
                "seconds": time.perf_counter() - t0,
                "tv_hmc_vs_exact_grid": _tv(pts, exact, edges),
                "tv_exact_sample_of_size_min_ess": _tv(ref, exact, edges),
                "tv_true_mixture_vs_exact_grid": 0.5
                * float(np.abs(to_bins(panels["true"][tag]) - exact).sum()),
            }
            log(
                f"    TV(HMC histogram, exact induced density) = {records[rid]['tv_hmc_vs_exact_grid']:.3f} "
                f"(an exact sample of {n_ref} draws: {records[rid]['tv_exact_sample_of_size_min_ess']:.3f}); "
                f"TV(true mixture, induced) = {records[rid]['tv_true_mixture_vs_exact_grid']:.3f}"
            )
    os.makedirs(opts.out_dir, exist_ok=True)
    png = os.path.join(opts.out_dir, "fig3_mixture.png")
    plot_mixture(panels, chain_sets, (gxx, gyy), x, y, opts.energies, k_cls, png)
    return {
        "figure": "3",
        "what": "density of x induced by a 3-hidden-layer BNN (bp) classifying a 2-D Gaussian mixture",
        "target": "x | y=k ~ p0(x) exp(-J(x, k)); x ~ p0(x) sum_k exp(-J(x, k)); "
        "p0 = Gaussian fitted to the training inputs",
        "mixture": mx | {"covariances": mixture_params()[1].tolist()},
        "network": info | {"test_accuracy": acc, "bayes_optimal_accuracy": bayes_acc},
        "chain_sets": records,
        "all_converged": all(r.converged for r in chain_sets.values()),
        "png": png,
        "seconds": time.perf_counter() - t_start,
    }


def plot_mixture(
    panels: dict[str, Any],
    sets: dict[str, dj.JointSamples],
    mesh: tuple[Tensor, Tensor],
    x: Tensor,
    y: Tensor,
    energies: tuple[str, ...],
    k_cls: int,
    path: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gxx, gyy = (a.numpy() for a in mesh)
    tags: list[Any] = [*range(k_cls), "total"]
    rows = ["true", *energies]
    fig, axes = plt.subplots(len(rows), len(tags), figsize=(3.4 * len(tags), 3.3 * len(rows)), squeeze=False)
    cols = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    ext = (gxx.min(), gxx.max(), gyy.min(), gyy.max())
    for r, row in enumerate(rows):
        for c, tag in enumerate(tags):
            ax = axes[r, c]
            dens = panels[row][tag].reshape(gxx.shape).numpy()
            levels = float(dens.max()) * np.array([0.05, 0.2, 0.4, 0.6, 0.8])  # not 0: underflow edges
            if row == "true":
                ax.contour(gxx, gyy, dens, levels=levels, colors="k", linewidths=0.8)
                sel = slice(None) if tag == "total" else (y == tag)
                ax.scatter(x[sel, 0], x[sel, 1], s=2, c=[cols[int(t)] for t in y[sel]], alpha=0.5)
                ax.set_title(f"true mixture: {'p(x)' if tag == 'total' else f'p(x | y={tag})'}", fontsize=9)
            else:
                rid = f"{row}/{'x' if tag == 'total' else f'x|y={tag}'}"
                res = sets[rid]
                pts = res.x.reshape(-1, 2).numpy()
                ax.hist2d(pts[:, 0], pts[:, 1], bins=36, range=[ext[:2], ext[2:]], cmap="Greys", density=True)
                ax.contour(gxx, gyy, dens, levels=levels, colors="tab:red", linewidths=0.9)
                jn = "-log p(y|x)" if row == "predictive" else "E_q[-log p(y|x,W)]"
                what = "x" if tag == "total" else f"x | y={tag}"
                ax.set_title(
                    f"BNN, J = {jn}: {what}\nR-hat {res.max_rhat:.3f}, ESS {res.min_ess:.0f}", fontsize=8
                )
            ax.set_xlim(ext[0], ext[1])
            ax.set_ylim(ext[2], ext[3])
            ax.set_aspect("equal")
            ax.tick_params(labelsize=7)
    fig.suptitle(
        "Figure 3: density of x induced by a BNN (bp) classifying a Gaussian mixture; grey: NUTS draws, "
        "red: exact induced density on a grid",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ Figure 4: images

#: The CPU-scale network of Figure 4 and its training (``--dataset cifar10 --arch densenet_bc_100_12
#: --device cuda`` is the paper's setting).
IMAGES_RECIPE: dict[str, Any] = {
    "dataset": "mnist",
    "arch": "densenet_bc",
    "arch_options": {"depth": 10, "growth_rate": 12},
    "train_subset": 20000,
    "epochs": 3,
    "batch_size": 128,
    "lr": 3e-3,
    "kl_scale": 0.1,  # KL weight kl_scale / N (1 is Eq. 2); tempered: trains faster in few epochs
    "shrinkage": 1e-2,
    "classes": list(range(10)),
    # depth 4 (<= 15 leapfrog steps): depth 3 halves the gradients per draw but gave 4x fewer
    # effective draws per gradient (split R-hat up to 1.19) in a trial run
    "chains": {"warmup": 75, "samples": 100, "max_tree_depth": 4, "init_noise": 0.1},
    "workers": 1,
}


def _images_setup(opts: JointOptions) -> dict[str, Any]:
    """Data, recipe, the (untrained) method and its training settings: the same in the parent and
    in every worker process."""
    from dualflow import models
    from dualflow.experiments.data.images import load_dataset

    if len(opts.energies) != 1:
        raise ValueError(f"images: give one energy (--energies predictive or expected), got {opts.energies}")
    rc = {**IMAGES_RECIPE, **opts.extra}
    data = load_dataset(rc["dataset"], opts.data_dir).limit_train(rc["train_subset"])
    x = data.normalize(data.x_train)
    build = models.builder(
        rc["arch"],
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        normalization="none",
        **rc["arch_options"],
    )
    seed_everything(opts.seed)
    m = dm.create("bp", build, task="classification")
    cfg = TrainConfig(
        epochs=rc["epochs"],
        batch_size=rc["batch_size"],
        lr=rc["lr"],
        kl_weight=rc["kl_scale"] / x.shape[0],
        seed=opts.seed,
        progress=opts.progress,
    )
    key = {
        "name": f"images_{rc['dataset']}_{rc['arch']}",
        "seed": opts.seed,
        "recipe": {k: v for k, v in rc.items() if k not in ("classes", "chains", "workers")},  # training
    }
    return {"rc": rc, "energy": opts.energies[0], "data": data, "x": x, "m": m, "cfg": cfg, "key": key}


def _images_base(x: Tensor, rc: dict[str, Any], dev: torch.device) -> dj.GaussianBase:
    # p0 from (at most) the first 20000 images, on the device (a 3072^2 covariance on CIFAR)
    return dj.GaussianBase.fit(x[:20000].to(dev), shrinkage=rc["shrinkage"]).to("cpu")


def _images_chains(
    m: dm.Method,
    su: dict[str, Any],
    base: dj.GaussianBase,
    k: int,
    opts: JointOptions,
    log: Callable[[str], None],
) -> dj.JointSamples:
    """The chain set ``x | y = k`` (cached in ``workdir``)."""
    rc, ch = su["rc"], IMAGES_RECIPE["chains"]
    return dj.sample_joint(
        m,
        su["x"],
        su["data"].y_train,
        base=base,
        energy=su["energy"],
        label=int(k),
        chains=opts.chains,
        warmup=opts.warmup if opts.warmup is not None else ch["warmup"],
        samples=opts.samples if opts.samples is not None else ch["samples"],
        max_tree_depth=ch["max_tree_depth"],
        init_noise=ch["init_noise"],
        seed=opts.seed,
        cache_dir=_chain_cache(opts, f"images_{rc['dataset']}_{rc['arch']}_{su['energy']}_{k}"),
        progress=opts.progress,
        log=lambda s: log("    " + s),
    )


def _images_worker(job: tuple[JointOptions, list[int], int]) -> float:
    """Worker process: rebuild the trained network from ``workdir``, run the chain sets of
    ``classes`` into the chain cache (the parent then loads them). Returns its CPU seconds."""
    opts, classes, wid = job
    torch.set_num_threads(1)
    c0 = time.process_time()
    su = _images_setup(opts)
    m = su["m"]
    m.load_state_dict(torch.load(_model_path(opts.workdir, su["key"]), map_location="cpu", weights_only=True))
    dev = torch.device(opts.device)
    m.to(dev)
    base = _images_base(su["x"], su["rc"], dev)
    for k in classes:
        res = _images_chains(m, su, base, k, opts, lambda s: None)
        print(
            f"  [worker {wid}] x|y={k}: max split R-hat {res.max_rhat:.3f}, min ESS {res.min_ess:.0f}",
            flush=True,
        )
    return time.process_time() - c0


def run_images(opts: JointOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Figure 4 (see the module docstring). Returns the record; writes ``fig4_<dataset>.png``.

    With ``opts.extra["workers"] = W > 1`` the chain sets run in ``W`` processes (one thread
    each) that write the chain cache; the results are the same as with one process (every
    chain's seed depends only on ``seed`` and its index)."""
    t_start = time.perf_counter()
    su = _images_setup(opts)
    rc, energy, data, x, m = su["rc"], su["energy"], su["data"], su["x"], su["m"]
    workers = int(rc.get("workers", 1))
    if workers > 1 and opts.workdir is None:
        raise ValueError("--workers > 1 needs a --workdir (the workers hand their chains over through it)")
    n_test = min(2000, int(data.y_test.shape[0]))
    xt, yt = data.normalize(data.x_test[:n_test]), data.y_test[:n_test]
    log(f"{data!r}: training on {x.shape[0]} images; {rc['arch']} {rc['arch_options']}")
    from dualflow import models

    n_params = models.count_parameters(m.net)
    info = _fit_cached(m, (x, data.y_train), su["cfg"], su["key"], opts.workdir, log, device=opts.device)
    dev = torch.device(opts.device)
    acc = float((m.predict(xt.to(dev)).argmax(1).cpu() == yt).float().mean())
    log(f"  test accuracy {acc:.3f} on the first {n_test} test images ({n_params} parameters)")
    base = _images_base(x, rc, dev)
    classes = [int(k) for k in rc["classes"]]
    worker_cpu: list[float] = []
    if workers > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        log(f"sampling {len(classes)} chain sets in {workers} worker processes")
        jobs = [(opts, classes[i::workers], i) for i in range(workers)]
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            worker_cpu = list(pool.map(_images_worker, jobs))
    records: dict[str, Any] = {}
    shown: dict[int, dict[str, Tensor]] = {}
    ch = IMAGES_RECIPE["chains"]
    for k in classes:
        rid = f"{energy}/x|y={k}"
        t0 = time.perf_counter()
        log(
            f"sampling {rid}: {opts.chains} chains x ({opts.warmup or ch['warmup']} + "
            f"{opts.samples or ch['samples']}) NUTS on {base.dim} pixels"
        )
        res = _images_chains(m, su, base, k, opts, log)
        _log_result(log, rid, res)
        starts = torch.stack([x[ci["start_index"]] for ci in res.chains_info])
        p_k = res.label_probs[..., k]
        with torch.no_grad():
            p_start = m.predict(starts.to(dev)).cpu()[:, k]
        rh = res.rhat
        s = res.summary(per_dim=False)
        bad = res.not_converged()
        s["not_converged"] = {n: bad[n] for n in sorted(bad, key=lambda n: -bad[n])[:20]}
        s["n_not_converged"] = len(bad)
        records[rid] = s | {
            "seconds": time.perf_counter() - t0,
            "rhat_quantiles": {q: float(torch.quantile(rh, q)) for q in (0.5, 0.9, 0.99)},
            "ess_quantiles": {q: float(torch.quantile(res.ess, q)) for q in (0.01, 0.1, 0.5)},
            "mean_p_label_at_samples": float(p_k.mean()),
            "mean_p_label_at_starts": float(p_start.mean()),
            "mean_mahalanobis_sq_under_base": float(
                (base.whiten(res.x.reshape(-1, base.dim)) ** 2).sum(1).mean()
            ),
        }
        shown[k] = {
            "start": starts,
            "last": res.x[:, -1],
            "mean": res.x.reshape(-1, *x.shape[1:]).mean(0),
            "p": p_k[:, -1],
        }
    os.makedirs(opts.out_dir, exist_ok=True)
    png = os.path.join(opts.out_dir, f"fig4_{rc['dataset']}.png")
    plot_images(
        shown, data, png, f"{rc['dataset']} {rc['arch']} {rc['arch_options']} (bp), test acc {acc:.3f}"
    )
    return {
        "figure": "4",
        "what": "images x | y=k sampled by NUTS on the input of a Bayesian conv net (bp)",
        "energy": energy,
        "target": "x | y=k ~ p0(x) exp(-J(x, k)); "
        "p0 = Gaussian fitted to the normalised training images (shrunk covariance)",
        "recipe": rc,
        "network": info | {"test_accuracy": acc, "parameters": n_params, "n_test": n_test},
        "data": {"name": data.name, "source": data.source, "lossy": data.lossy},
        "chain_sets": records,
        "all_converged": all(r["converged"] for r in records.values()),
        "workers": workers,
        "worker_cpu_seconds": worker_cpu,
        "png": png,
        "seconds": time.perf_counter() - t_start,
    }


def plot_images(shown: dict[int, dict[str, Tensor]], data: Any, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = torch.tensor(data.mean).view(-1, 1, 1)
    std = torch.tensor(data.std).view(-1, 1, 1)

    def img(t: Tensor) -> np.ndarray:
        a = (t * std + mean).clamp(0, 1)  # back to pixel units; clipped for display only
        return a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()

    classes = sorted(shown)
    n_ch = shown[classes[0]]["last"].shape[0]
    cols = 2 + n_ch
    fig, axes = plt.subplots(len(classes), cols, figsize=(1.35 * cols, 1.45 * len(classes)), squeeze=False)
    for r, k in enumerate(classes):
        s = shown[k]
        tiles = [
            (s["start"][0], "start (chain 0)"),
            *[(s["last"][c], f"chain {c}: p={float(s['p'][c]):.2f}") for c in range(n_ch)],
            (s["mean"], "mean of draws"),
        ]
        for c, (t, lab) in enumerate(tiles):
            ax = axes[r, c]
            ax.imshow(img(t), cmap="gray" if t.shape[0] == 1 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(lab, fontsize=6)
            if c == 0:
                ax.set_ylabel(f"y = {data.classes[k]}", fontsize=8)
    fig.suptitle(f"Figure 4: x | y sampled by NUTS; {title}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: figure name -> (runner, output stem)
FIGURES: dict[str, tuple[Callable[..., dict[str, Any]], str]] = {
    "boston": (run_boston, "fig2_boston"),
    "mixture": (run_mixture, "fig3_mixture"),
    "images": (run_images, "fig4"),
}
