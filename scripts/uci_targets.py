"""Check the issue-10 target lines on UCI records (the splits present in both files).

* default ``bp`` (new records, label ``bp``) against the committed searched ``bp``
  (``--baseline``, label ``bp`` there): test LL at least baseline - 0.02 on >= 7 of 9 sets;
  compute ratio (seconds per split, new / baseline);
* ``bp-ng`` against ``bp`` of the new records: no split more than 1 nat below ``bp`` on the
  same split; mean LL >= ``bp`` on >= 5 of 9 sets;
* default ``bp`` against laplace-torch's full Laplace (``--peers``, the records of
  ``benchmarks/peers_uci.py``) on boston, concrete, energy, yacht, wine, on the splits present
  in both files: ahead on >= 4 of 5 (the peers file's own ``bp`` row, same recipe, is shown
  beside it);
* the wall time of the new run (``elapsed_seconds`` of its meta).

Only splits present in both files are compared (so a subset of splits gives the check on that
subset). Seconds are wall times of this machine at the time of each run: compare them only
between runs made under the same load.

Usage::

    python scripts/uci_targets.py --new runs/uci/default.json --baseline results/uci/uci_full.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dualflow.experiments import uci


def _by(records, label):
    return {
        (r["dataset"], int(r["split"])): r
        for r in records
        if uci.record_label(r) == label and r["ll"] is not None
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new", nargs="+", required=True)
    p.add_argument("--baseline", default="results/uci/uci_full.json")
    p.add_argument("--baseline-label", default="bp")
    p.add_argument("--peers", default="benchmarks/results/peers_uci.json", help="peers_uci.py records")
    args = p.parse_args()
    new = uci.load_records(args.new)
    base = uci.load_records([args.baseline])
    bp, ng = _by(new, "bp"), _by(new, "bp-ng")
    ref = _by(base, args.baseline_label)
    sets = [d for d in uci.TABLE2 if any(k[0] == d for k in bp)]
    print(
        "| data | splits | bp default LL | searched bp LL | diff | >= -0.02 | time ratio | "
        "bp-ng LL | bp-ng - bp | worst split (bp-ng - bp) |"
    )
    print("|---" * 10 + "|")
    ok_bp = ok_ng = n_ng = 0
    worst_all = np.inf
    for d in sets:
        keys = sorted(k for k in bp if k[0] == d and k in ref)
        if not keys:
            continue
        a = np.array([bp[k]["ll"] for k in keys])
        b = np.array([ref[k]["ll"] for k in keys])
        t = np.mean([bp[k]["seconds"] for k in keys]) / np.mean([ref[k]["seconds"] for k in keys])
        diff = a.mean() - b.mean()
        ok_bp += diff >= -0.02
        cells = [
            d,
            str(len(keys)),
            f"{a.mean():.3f}",
            f"{b.mean():.3f}",
            f"{diff:+.3f}",
            "yes" if diff >= -0.02 else "no",
            f"{t:.2f}",
        ]
        kn = [k for k in keys if k in ng]
        if kn:
            c = np.array([ng[k]["ll"] for k in kn])
            e = np.array([bp[k]["ll"] for k in kn])
            worst = float((c - e).min())
            worst_all = min(worst_all, worst)
            n_ng += 1
            ok_ng += c.mean() >= e.mean()
            cells += [f"{c.mean():.3f}", f"{c.mean() - e.mean():+.3f}", f"{worst:+.3f}"]
        else:
            cells += ["–", "–", "–"]
        print("| " + " | ".join(cells) + " |")
    print()
    print(f"default bp >= searched bp - 0.02 on {ok_bp} of {len(sets)} sets (target: >= 7 of 9)")
    if n_ng:
        print(
            f"bp-ng mean LL >= bp on {ok_ng} of {n_ng} sets (target: >= 5 of 9); "
            f"worst split bp-ng - bp: {worst_all:+.3f} (target: >= -1)"
        )
    if Path(args.peers).is_file():
        _laplace(bp, json.loads(Path(args.peers).read_text())["records"])
    for path in args.new:
        meta = json.loads(Path(path).read_text()).get("meta", {})
        if "elapsed_seconds" in meta:
            print(f"{path}: wall time {meta['elapsed_seconds'] / 60:.1f} min ({meta.get('command', '')})")


PEER_SETS = ("boston", "concrete", "energy", "yacht", "wine")


def _laplace(bp: dict, peers: list[dict]) -> None:
    """Default ``bp`` of the new records against laplace-torch on the splits both have."""
    ok = lambda r: r.get("error") is None and r.get("ll") is not None  # noqa: E731
    lap = {(r["dataset"], int(r["split"])): r for r in peers if r["peer"] == "laplace" and ok(r)}
    own = {(r["dataset"], int(r["split"])): r for r in peers if r["peer"] == "bp" and ok(r)}
    print()
    print("| data | splits | bp default LL (this run) | laplace-torch LL | diff | peers file's bp LL |")
    print("|---" * 6 + "|")
    ahead = n = 0
    for d in PEER_SETS:
        keys = sorted(k for k in bp if k[0] == d and k in lap)
        if not keys:
            continue
        a = np.mean([bp[k]["ll"] for k in keys])
        b = np.mean([lap[k]["ll"] for k in keys])
        o = [own[k]["ll"] for k in keys if k in own]
        n += 1
        ahead += a > b
        own_cell = f"{np.mean(o):.3f} ({len(o)})" if o else "–"
        print(f"| {d} | {len(keys)} | {a:.3f} | {b:.3f} | {a - b:+.3f} | {own_cell} |")
    print()
    print(f"default bp ahead of laplace-torch on {ahead} of {n} sets (target: >= 4 of 5)")


if __name__ == "__main__":
    main()
