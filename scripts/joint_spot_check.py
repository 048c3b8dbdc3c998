"""Spot check: does the current code reproduce a committed Figure 2 chain set?

Retrains Figure 2's ``bp`` network (Boston split 0, the recipe of
:data:`dualflow.experiments.joint.BOSTON_RECIPE`), compares its weights with the network that
made ``results/figures/fig2_boston.json`` (cached by that run in ``--workdir``; the cache is not
part of the repository), reruns the ``bp/predictive`` chain set and prints its split R-hat / ESS
next to the record's, and how far each chain's draws are from the cached chain's::

    python scripts/joint_spot_check.py --workdir runs/joint

One thread, about half a CPU-minute.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/joint", help="cache of the run that made the record")
    p.add_argument("--record", default="results/figures/fig2_boston.json")
    p.add_argument("--old-model", default="model_bp_3af1e0e8341a.pt", help="file of the cached bp network")
    args = p.parse_args()
    torch.set_num_threads(1)
    from dualflow import joint as dj
    from dualflow.experiments import joint as ej

    c0 = time.process_time()
    data = ej._boston_data(None)
    x, y = data["x"], data["y"]
    m, cfg = ej._boston_method("bp", x.shape[1], 0)
    ej._fit_cached(m, (x, y), cfg, {"name": "bp"}, None, print)
    old = torch.load(os.path.join(args.workdir, args.old_model), weights_only=True)
    new = {
        k.replace("members.0.", "net.").replace("likelihoods.0.", "likelihood."): v
        for k, v in m.state_dict().items()
    }
    common = sorted(set(old) & set(new) - {"fitted", "_fitted"})
    diff = max(float((old[k].float() - new[k].float()).abs().max()) for k in common)
    print(f"{len(common)} tensors compared; max |new - old| = {diff:.3g}")
    rc = ej.BOSTON_RECIPE["chains"]
    base = dj.GaussianBase.fit(x)
    res = dj.sample_joint(
        m, x, y, base=base, energy="predictive", chains=4, warmup=rc["warmup"], samples=rc["samples"],
        max_tree_depth=rc["max_tree_depth"], init_noise=rc["init_noise"], seed=0, log=print,
    )  # fmt: skip
    rec = json.load(open(args.record))["chain_sets"]["bp/predictive"]
    for who, r in (
        ("now", {"max_rhat": res.max_rhat, "min_ess": res.min_ess, "median_ess": float(res.ess.median())}),
        ("record", rec),
    ):
        print(
            f"{who}: max R-hat {r['max_rhat']:.4f}, min ESS {r['min_ess']:.0f}, "
            f"median ESS {r['median_ess']:.0f}"
        )
    d = x.shape[1]
    for c in range(4):
        files = glob.glob(os.path.join(args.workdir, "chains", "boston_bp_predictive", f"chain{c}_*.pt"))
        if files:
            z_old = torch.load(files[0], weights_only=True)["q"][:, :d]
            gap = float((base.whiten(res.x[c]) - z_old).abs().max())
            print(f"chain {c}: max |z_now - z_record| over its draws = {gap:.3g} (whitened units)")
    print(f"CPU {time.process_time() - c0:.1f}s")


if __name__ == "__main__":
    main()
