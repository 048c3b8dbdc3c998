"""``dualflow duality``: belief propagation *is* backpropagation, checked numerically.

On random models of a chosen size it computes each smoother twice, by an explicit
message-passing pass and by one autodiff pass over the filter (docs/maths.md sections 4-5,
the paper's Theorems 3-4), and prints the largest discrepancy per identity:

* Kalman smoother means and covariances: backprop vs Rauch-Tung-Striebel;
* Kalman filter log-likelihood vs the exact joint-Gaussian density (small models);
* HMM smoother marginals: backprop vs forward-backward.

Exit status 1 if an exact identity exceeds its tolerance (relative to ``max(1, scale)``;
default 1e-8 in float64, 1e-3 in float32).

The table is a list of :class:`Row` produced by the functions in :data:`ROW_PROVIDERS`;
more rows (e.g. "gaussian-linear network", "BNN vs importance sampling") are added by
appending a provider there (or calling :func:`register_rows`). A provider returns rows with
``tol=None`` for relations that are approximations: those are reported, never enforced.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from dualflow import graphical as gm

HELP = "check smoothing-by-backprop against explicit smoothers (Kalman RTS, HMM forward-backward)"

DEFAULT_TOL = {torch.float64: 1e-8, torch.float32: 1e-3}
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


# ============================================================================ rows
@dataclass
class Row:
    """One line of the report: the largest discrepancy of one identity over all cases.

    Attributes:
        identity: what is compared, e.g. ``"Kalman smoother mean: backprop vs RTS"``.
        max_abs_err: ``max |a - b|`` over all cases and entries.
        scale: ``max |reference|`` over the same entries.
        tol: tolerance on ``max_abs_err / max(1, scale)``; ``None`` marks an approximate
            relation that is reported but not enforced.
        cases: number of random models compared.
        note: free text (e.g. why a check was skipped).
    """

    identity: str
    max_abs_err: float
    scale: float
    tol: float | None
    cases: int
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def rel_err(self) -> float:
        return self.max_abs_err / max(1.0, self.scale)

    @property
    def ok(self) -> bool:
        if self.tol is None:
            return True
        return math.isfinite(self.rel_err) and self.rel_err <= self.tol

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rel_err"] = self.rel_err
        for k in ("max_abs_err", "scale", "rel_err"):  # strict JSON: no NaN
            if not math.isfinite(d[k]):
                d[k] = None
        d["exact"] = self.tol is not None
        d["ok"] = self.ok
        return d


class _Acc:
    """Accumulates max |a - b| and max |b| over cases."""

    def __init__(self) -> None:
        self.err = 0.0
        self.scale = 0.0
        self.cases = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.detach().double(), b.detach().double()
        self.err = max(self.err, float((a - b).abs().amax()))
        self.scale = max(self.scale, float(b.abs().amax()))
        self.cases += 1

    def row(self, identity: str, tol: float | None, note: str = "") -> Row:
        return Row(identity, self.err, self.scale, tol, self.cases, note)


RowProvider = Callable[[argparse.Namespace], list[Row]]


# ============================================================================ models
def random_lgssm(
    n: int,
    m: int,
    T: int,
    *,
    seed: int,
    batch: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, ...]:
    """A random stable linear-Gaussian state-space model and data simulated from it.

    ``F`` has spectral radius 0.95; ``Q``, ``R``, ``P0`` are random SPD matrices with
    eigenvalues in ``[0.1, 1]`` (``P0``: ``[0.1, 10]``); ``z`` is simulated from the model.

    Returns:
        ``(z, F, H, Q, R, x0, P0)`` with shapes as in :func:`dualflow.graphical.kalman_filter`
        (leading ``batch`` dimension on every tensor if ``batch`` is given).
    """
    g = torch.Generator().manual_seed(seed)
    bs = () if batch is None else (batch,)
    f64 = torch.float64

    def spd(k: int, lo: float, hi: float) -> torch.Tensor:
        u, _ = torch.linalg.qr(torch.randn(*bs, k, k, generator=g, dtype=f64))
        return (u * torch.logspace(lo, hi, k, dtype=f64)) @ u.mT

    F = torch.randn(*bs, n, n, generator=g, dtype=f64)
    F = 0.95 * F / torch.linalg.eigvals(F).abs().amax(-1)[..., None, None]
    H = torch.randn(*bs, m, n, generator=g, dtype=f64)
    Q, R, P0 = spd(n, -1, 0), spd(m, -1, 0), spd(n, -1, 1)
    x0 = torch.randn(*bs, n, generator=g, dtype=f64)
    lq, lr, lp = (torch.linalg.cholesky(a) for a in (Q, R, P0))
    x = x0 + (lp @ torch.randn(*bs, n, 1, generator=g, dtype=f64)).squeeze(-1)
    zs = []
    for t in range(T):
        if t > 0:
            x = (F @ x.unsqueeze(-1) + lq @ torch.randn(*bs, n, 1, generator=g, dtype=f64))[..., 0]
        e = (lr @ torch.randn(*bs, m, 1, generator=g, dtype=f64)).squeeze(-1)
        zs.append((H @ x.unsqueeze(-1)).squeeze(-1) + e)
    z = torch.stack(zs, dim=-2)
    return tuple(a.to(dtype=dtype, device=device) for a in (z, F, H, Q, R, x0, P0))


def random_hmm(
    S: int,
    T: int,
    *,
    seed: int,
    batch: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, ...]:
    """A random HMM (sticky transitions, Gaussian emissions) and log-likelihoods of data
    simulated from it.

    Returns:
        ``(log_obs, transition, initial)`` as in :func:`dualflow.graphical.hmm_filter`.
    """
    g = torch.Generator().manual_seed(seed)
    bs = () if batch is None else (batch,)
    f64 = torch.float64
    A = torch.rand(*bs, S, S, generator=g, dtype=f64) + 3.0 * torch.eye(S, dtype=f64)
    A = A / A.sum(-1, keepdim=True)
    pi = torch.rand(*bs, S, generator=g, dtype=f64) + 0.1
    pi = pi / pi.sum(-1, keepdim=True)
    centres = torch.linspace(-2.0, 2.0, S, dtype=f64)
    state = torch.multinomial(pi.reshape(-1, S), 1, generator=g).squeeze(-1)
    ys = []
    for t in range(T):
        if t > 0:
            rows = A.reshape(-1, S, S)[torch.arange(state.numel()), state]
            state = torch.multinomial(rows, 1, generator=g).squeeze(-1)
        ys.append(centres[state] + torch.randn(state.shape, generator=g, dtype=f64))
    y = torch.stack(ys, -1).reshape(*bs, T)
    log_obs = -0.5 * (y.unsqueeze(-1) - centres) ** 2 - 0.5 * math.log(2 * math.pi)
    return tuple(a.to(dtype=dtype, device=device) for a in (log_obs, A, pi))


def _joint_gaussian_loglik(z, F, H, Q, R, x0, P0) -> torch.Tensor:
    """Exact log p(z) from the joint Gaussian of all observations (unbatched, float64)."""
    z, F, H, Q, R, x0, P0 = (a.detach().double().cpu() for a in (z, F, H, Q, R, x0, P0))
    T = z.shape[0]
    mus, blocks = [x0], [[None] * T for _ in range(T)]
    blocks[0][0] = P0
    for t in range(1, T):
        mus.append(F @ mus[-1])
        blocks[t][t] = F @ blocks[t - 1][t - 1] @ F.T + Q
    for t in range(T):
        for s in range(t - 1, -1, -1):
            blocks[t][s] = F @ blocks[t - 1][s]
            blocks[s][t] = blocks[t][s].T
    Cx = torch.cat([torch.cat(r, 1) for r in blocks], 0)
    Hb = torch.block_diag(*[H] * T)
    Cz = Hb @ Cx @ Hb.T + torch.block_diag(*[R] * T)
    muz = Hb @ torch.cat(mus)
    return torch.distributions.MultivariateNormal(muz, Cz).log_prob(z.reshape(-1))


# ============================================================================ providers
def kalman_rows(args: argparse.Namespace) -> list[Row]:
    """Kalman smoother by backprop vs RTS; filter log-likelihood vs joint Gaussian."""
    dtype, tol = _dtype(args), _tol(args)
    n, m, T = args.state_dim, args.obs_dim, args.length
    mean, cov, ll = _Acc(), _Acc(), _Acc()
    brute = T * max(n, m) <= 1500
    for seed in range(args.seeds):
        model = random_lgssm(n, m, T, seed=seed, dtype=dtype, device=args.device)
        xs, Ps = gm.rts_smoother(*model)
        xb, Pb = gm.kalman_smoother_by_backprop(*model, vjp="autograd")  # the duality: torch autodiff
        mean.add(xb, xs)
        cov.add(Pb, Ps)
        if brute:
            ll.add(gm.kalman_filter(*model)[2], _joint_gaussian_loglik(*model))
    rows = [
        mean.row("Kalman smoother mean: backprop vs RTS", tol),
        cov.row("Kalman smoother cov: backprop vs RTS", tol),
    ]
    if brute:
        rows.append(ll.row("Kalman log-lik: filter vs joint Gaussian", tol))
    else:
        rows.append(
            Row("Kalman log-lik: filter vs joint Gaussian", math.nan, math.nan, None, 0,
                note=f"skipped: T*max(n, m) = {T * max(n, m)} > 1500 (dense reference)")
        )  # fmt: skip
    return rows


def hmm_rows(args: argparse.Namespace) -> list[Row]:
    """HMM smoother by backprop (Theorem 4) vs forward-backward."""
    dtype, tol = _dtype(args), _tol(args)
    gamma = _Acc()
    for seed in range(args.seeds):
        model = random_hmm(args.hmm_states, args.length, seed=seed, dtype=dtype, device=args.device)
        gamma.add(gm.hmm_smoother_by_backprop(*model), gm.hmm_forward_backward(*model))
    return [gamma.row("HMM smoother marginals: backprop vs forward-backward", tol)]


def network_rows(args: argparse.Namespace) -> list[Row]:
    """Networks (docs/maths.md section 4): ``dualflow.smooth`` vs exact Gaussian conditioning on a
    Gaussian-linear network, and vs importance sampling on a nonlinear BNN (approximate)."""
    from dualflow import nn as dnn
    from dualflow.smoothing import importance_smoothing, smooth

    dtype, tol = _dtype(args), _tol(args)
    hid, d_in, q1, r = max(2, args.state_dim), max(1, args.obs_dim), 0.7, 0.3
    mean, var = _Acc(), _Acc()
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        net = dnn.Sequential(
            dnn.Linear(d_in, hid, bayes=False), dnn.AddNoise(q1), dnn.Linear(hid, 1, bayes=False)
        ).to(dtype)
        x = torch.randn(8, d_in, dtype=dtype)
        y = torch.randn(8, 1, dtype=dtype)
        h = smooth(net, x, y, noise_var=r)[1]
        w1, b1 = net[0].weight_mu.detach(), net[0].bias_mu.detach()
        w2, b2 = net[2].weight_mu.detach()[0], net[2].bias_mu.detach()
        mu = x @ w1.T + b1
        s = q1 * (w2 @ w2) + r
        post_m = mu + (q1 * w2)[None] * ((y[:, 0] - mu @ w2 - b2) / s)[:, None]
        post_v = (q1 - q1 * q1 * w2 * w2 / s).expand_as(mu)
        mean.add(h.smoothed.mean, post_m)
        var.add(h.smoothed.var, post_v)
    rows = [
        mean.row("Gaussian-linear net, hidden posterior mean: smooth vs exact", tol),
        var.row("Gaussian-linear net, hidden posterior var: smooth vs exact", tol),
    ]
    # nonlinear BNN: approximate; report the mean discrepancy in units of the prior sd
    errs, gaps = [], []
    for seed in range(args.seeds):
        torch.manual_seed(100 + seed)
        net = dnn.Sequential(
            dnn.Linear(d_in, 8, init_var_ratio=0.3),
            dnn.ReLU(),
            dnn.Linear(8, 1, gain=1.0, init_var_ratio=0.3),
        ).to(torch.float64)
        x = torch.randn(4, d_in, dtype=torch.float64)
        y = 2 * torch.randn(4, 1, dtype=torch.float64)
        bp = smooth(net, x, y, noise_var=0.2)
        mc = importance_smoothing(net, x, y, 0.2, samples=2000, generator=torch.Generator().manual_seed(seed))
        for a, b in zip(bp, mc):
            sd = float(b.filtered.var.sqrt().mean()) + 1e-12
            errs.append(float((a.smoothed.mean - b.smoothed.mean).abs().mean()) / sd)
            gaps.append(float((a.filtered.mean - b.smoothed.mean).abs().mean()) / sd)
    rows.append(
        Row("BNN posterior mean (mean |err| / mean sd): smooth vs IS", max(errs), 1.0, None, args.seeds,
            note=f"approximate; filter-only (no smoothing) would be off by {max(gaps):.3f} sd")
    )  # fmt: skip
    return rows


#: Row providers, in table order. Append (name, provider) to add rows.
ROW_PROVIDERS: list[tuple[str, RowProvider]] = [
    ("kalman", kalman_rows),
    ("hmm", hmm_rows),
    ("network", network_rows),
]


def register_rows(name: str, provider: RowProvider) -> None:
    """Add a row provider (e.g. "gaussian-linear network") to the report."""
    if any(n == name for n, _ in ROW_PROVIDERS):
        raise ValueError(f"row provider {name!r} is already registered")
    ROW_PROVIDERS.append((name, provider))


def collect_rows(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    for _, provider in ROW_PROVIDERS:
        rows.extend(provider(args))
    return rows


# ============================================================================ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dim", type=int, default=4, help="Kalman state dimension n (4)")
    p.add_argument("--obs-dim", type=int, default=2, help="Kalman observation dimension m (2)")
    p.add_argument("--length", type=int, default=50, help="sequence length T (50)")
    p.add_argument("--hmm-states", type=int, default=5, help="number of HMM states S (5)")
    p.add_argument("--seeds", type=int, default=3, help="random models per check (3)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float64")
    p.add_argument(
        "--tol",
        type=float,
        default=None,
        help="tolerance on max|diff| / max(1, scale) (default 1e-8 float64, 1e-3 float32)",
    )
    p.add_argument("--device", default="cpu", help="torch device (cpu)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of a smoothed 1-D track here")


def _dtype(args: argparse.Namespace) -> torch.dtype:
    return _DTYPES[args.dtype]


def _tol(args: argparse.Namespace) -> float:
    return DEFAULT_TOL[_dtype(args)] if args.tol is None else float(args.tol)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("state_dim", "obs_dim", "length", "hmm_states", "seeds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tol is not None and not args.tol > 0:
        raise ValueError(f"--tol must be > 0, got {args.tol}")
    if args.dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {args.dtype!r}")


def format_table(rows: list[Row]) -> str:
    head = f"{'identity':<62} {'cases':>5} {'max|diff|':>10} {'scale':>9} {'rel.err':>9} "
    head += f"{'tol':>8}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        tol = "approx" if r.tol is None else f"{r.tol:.0e}"
        if r.cases == 0:
            status = "skipped"
        else:
            status = "ok" if r.ok and r.tol is not None else ("info" if r.ok else "FAIL")
        lines.append(
            f"{r.identity:<62} {r.cases:>5} {r.max_abs_err:>10.2e} {r.scale:>9.3g} "
            f"{r.rel_err:>9.2e} {tol:>8}  {status}" + (f"  ({r.note})" if r.note else "")
        )
    return "\n".join(lines)


def tracking_example(
    T: int = 100, seed: int = 0, dtype: torch.dtype = torch.float64, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """1-D constant-velocity tracking (state: position, velocity; observed: position)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    dt, q, r = 1.0, 0.05, 4.0
    F = torch.tensor([[1.0, dt], [0.0, 1.0]], dtype=f64)
    Q = q * torch.tensor([[dt**3 / 3, dt**2 / 2], [dt**2 / 2, dt]], dtype=f64)
    H = torch.tensor([[1.0, 0.0]], dtype=f64)
    R = torch.tensor([[r]], dtype=f64)
    x0 = torch.tensor([0.0, 0.5], dtype=f64)
    P0 = torch.diag(torch.tensor([4.0, 1.0], dtype=f64))
    lq = torch.linalg.cholesky(Q)
    x = x0 + torch.linalg.cholesky(P0) @ torch.randn(2, generator=g, dtype=f64)
    xs, zs = [], []
    for t in range(T):
        if t > 0:
            x = F @ x + lq @ torch.randn(2, generator=g, dtype=f64)
        xs.append(x)
        zs.append(H @ x + math.sqrt(r) * torch.randn(1, generator=g, dtype=f64))
    out = {"z": torch.stack(zs), "F": F, "H": H, "Q": Q, "R": R, "x0": x0, "P0": P0}
    out = {k: v.to(dtype=dtype, device=device) for k, v in out.items()}
    out["truth"] = torch.stack(xs)
    return out


def plot_tracking(path: str, dtype: torch.dtype = torch.float64, device: str = "cpu") -> float:
    """Plot the smoothed position of :func:`tracking_example` by both routes (+-2 sd).

    Returns the largest absolute discrepancy of the plotted means and sds.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    ex = tracking_example(dtype=dtype, device=device)
    model = [ex[k] for k in ("z", "F", "H", "Q", "R", "x0", "P0")]
    xf, Pf, _ = gm.kalman_filter(*model)
    xs, Ps = gm.rts_smoother(*model)
    xb, Pb = gm.kalman_smoother_by_backprop(*model, vjp="autograd")
    t = torch.arange(ex["z"].shape[0]).numpy()

    def pos(x, P):
        return x[:, 0].double().cpu().numpy(), P[:, 0, 0].clamp(min=0).sqrt().double().cpu().numpy()

    (mf, _), (ms, ss), (mb, sb) = pos(xf, Pf), pos(xs, Ps), pos(xb, Pb)
    diff = float(max(abs(ms - mb).max(), abs(ss - sb).max()))
    fig = Figure(figsize=(9, 4.5), dpi=120)
    ax = fig.subplots()
    ax.plot(t, ex["truth"][:, 0].numpy(), color="0.3", lw=1, label="true position")
    ax.plot(t, ex["z"][:, 0].double().cpu().numpy(), ".", color="k", ms=3, label="observations")
    ax.plot(t, mf, color="tab:orange", lw=0.8, alpha=0.7, label="filter mean")
    ax.fill_between(t, ms - 2 * ss, ms + 2 * ss, color="tab:blue", alpha=0.2, label="RTS ±2 sd")
    ax.plot(t, ms, color="tab:blue", lw=2, label="RTS smoother mean")
    ax.plot(t, mb, "--", color="tab:red", lw=1.2, label="backprop smoother mean")
    ax.plot(t, mb - 2 * sb, ":", color="tab:red", lw=1)
    ax.plot(t, mb + 2 * sb, ":", color="tab:red", lw=1, label="backprop ±2 sd")
    ax.set_xlabel("time step")
    ax.set_ylabel("position")
    ax.set_title(
        f"1-D constant-velocity tracking: smoother by backprop vs RTS (max |diff| of mean/sd = {diff:.1e})",
        fontsize=10,
    )
    ax.legend(fontsize=8, ncol=2, loc="best")
    fig.tight_layout()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path)
    return diff


def run(args: argparse.Namespace) -> int:
    """Run all row providers, print the table, optionally write JSON/PNG; 1 on failure."""
    from dualflow.experiments.io import check_writable, require_extra

    check_writable(args.out, option="--out")
    check_writable(args.plot, option="--plot")
    if args.plot:
        require_extra("plot", purpose="dualflow duality --plot")
    _check_args(args)
    # long chains of tiny ops: intra-op threads only add overhead (restored afterwards)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    rows = collect_rows(args)
    print(format_table(rows))
    report: dict = {
        "command": "duality",
        "config": {
            "state_dim": args.state_dim,
            "obs_dim": args.obs_dim,
            "length": args.length,
            "hmm_states": args.hmm_states,
            "seeds": args.seeds,
            "dtype": args.dtype,
            "tol": _tol(args),
            "device": str(args.device),
        },
        "torch": torch.__version__,
        "rows": [r.to_dict() for r in rows],
    }
    if args.plot:
        report["plot"] = {
            "path": args.plot,
            "max_abs_diff": plot_tracking(args.plot, _dtype(args), args.device),
        }
        print(f"plot: {args.plot}")
    ok = all(r.ok for r in rows)
    report["ok"] = ok
    report["seconds"] = time.perf_counter() - t0
    if args.out:
        parent = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(parent, exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2, allow_nan=True)
        print(f"report: {args.out}")
    failed = [r.identity for r in rows if not r.ok]
    if failed:
        print("FAILED (exact identity above tolerance): " + "; ".join(failed))
        return 1
    print(f"all exact identities hold to {_tol(args):.0e} ({report['seconds']:.1f} s)")
    return 0
