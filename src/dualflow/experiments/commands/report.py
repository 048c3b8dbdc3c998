"""``dualflow report <name>``: tables and plots from result records.

Reports are listed in :data:`REPORTS` (name -> :class:`Report`); each adds its own options
and renders its own files. ``dualflow report uci --results FILE [FILE ...] --out README.md``
writes the Markdown table of the UCI benchmark beside the paper's Table 2 and the published
anchors, and a plot.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HELP = "tables and plots from result records: `dualflow report uci`"


@dataclass(frozen=True)
class Report:
    """One report: a help line, its options and the function that renders it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ============================================================================ UCI

#: The paper's Table 2: data set -> method -> (LL, LL ±, RMSE, RMSE ±) as printed.
PAPER_TABLE2: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "boston": {"BP": (-2.6, 0.4, 3.5, 1.0), "DE": (-2.5, 0.1, 3.3, 1.0), "Reparam": (-3.2, 0.7, 3.5, 1.1)},
    "concrete": {"BP": (-3.2, 0.3, 6.1, 0.8), "DE": (-3.4, 0.1, 7.7, 0.6), "Reparam": (-3.9, 0.2, 6.8, 0.5)},
    "energy": {"BP": (-2.2, 0.2, 2.7, 0.4), "DE": (-2.2, 0.1, 2.7, 0.3), "Reparam": (-3.0, 0.3, 2.9, 0.3)},
    "kin8nm": {"BP": (1.1, 0.0, 0.1, 0.0), "DE": (0.4, 0.0, 0.2, 0.0), "Reparam": (-2.3, 0.5, 0.1, 0.0)},
    "naval": {"BP": (4.0, 2.1, 0.0, 0.0), "DE": (2.9, 0.1, 0.0, 0.0), "Reparam": (4.9, 0.1, 0.0, 0.0)},
    "power": {"BP": (-2.8, 0.0, 4.1, 0.2), "DE": (-3.0, 0.0, 4.3, 0.2), "Reparam": (-3.2, 0.1, 4.2, 0.2)},
    "protein": {"BP": (-2.9, 0.0, 4.4, 0.1), "DE": (-3.0, 0.0, 5.1, 0.1), "Reparam": (-3.5, 0.1, 4.5, 0.0)},
    "wine": {"BP": (-1.0, 0.1, 0.6, 0.0), "DE": (-0.9, 0.1, 0.6, 0.0), "Reparam": (-1.4, 0.2, 0.6, 0.0)},
    "yacht": {"BP": (-2.8, 0.4, 64.0, 19.0), "DE": (-2.7, 0.2, 59.0, 17.0), "Reparam": (-2.5, 0.3, 4.1, 0.9)},
}
#: (data set, method) whose printed RMSE is a typo (yacht: 64 and 59 for a target in [0, 63]).
PAPER_RMSE_TYPOS = {("yacht", "BP"), ("yacht", "DE")}

#: Published test log-likelihoods on the same splits (DVI: its own 20 random 90/10 splits).
PUBLISHED_LL: dict[str, dict[str, float]] = {
    "boston": {"PBP": -2.57, "MCD'16": -2.46, "MCD'18": -2.40, "DE": -2.41, "DVI": -2.41},
    "concrete": {"PBP": -3.16, "MCD'16": -3.04, "MCD'18": -2.93, "DE": -3.06, "DVI": -3.06},
    "energy": {"PBP": -2.04, "MCD'16": -1.99, "MCD'18": -1.21, "DE": -1.38, "DVI": -1.01},
    "kin8nm": {"PBP": 0.90, "MCD'16": 0.95, "MCD'18": 1.14, "DE": 1.20, "DVI": 1.13},
    "naval": {"PBP": 3.73, "MCD'16": 3.80, "MCD'18": 4.45, "DE": 5.63, "DVI": 6.29},
    "power": {"PBP": -2.84, "MCD'16": -2.80, "MCD'18": -2.80, "DE": -2.79, "DVI": -2.80},
    "protein": {"PBP": -2.97, "MCD'16": -2.89, "MCD'18": -2.87, "DE": -2.83, "DVI": -2.85},
    "wine": {"PBP": -0.97, "MCD'16": -0.93, "MCD'18": -0.93, "DE": -0.94, "DVI": -0.90},
    "yacht": {"PBP": -1.63, "MCD'16": -1.55, "MCD'18": -1.25, "DE": -1.18, "DVI": -0.47},
}
#: Published test RMSEs on the same splits.
PUBLISHED_RMSE: dict[str, dict[str, float]] = {
    "boston": {"PBP": 3.01, "MCD'18": 2.90, "DE": 3.28},
    "concrete": {"PBP": 5.67, "MCD'18": 4.82, "DE": 6.03},
    "energy": {"PBP": 1.80, "MCD'18": 0.54, "DE": 2.09},
    "kin8nm": {"PBP": 0.10, "MCD'18": 0.08, "DE": 0.09},
    "naval": {"PBP": 0.01, "MCD'18": 0.00, "DE": 0.00},
    "power": {"PBP": 4.12, "MCD'18": 4.01, "DE": 4.11},
    "protein": {"PBP": 4.73, "MCD'18": 4.27, "DE": 4.71},
    "wine": {"PBP": 0.64, "MCD'18": 0.62, "DE": 0.64},
    "yacht": {"PBP": 1.02, "MCD'18": 0.67, "DE": 1.58},
}
SOURCES = (
    "Paper: Table 2 of *Duality of information flow* (BP = its Algorithm 1, DE = deep ensembles, "
    "Reparam = Bayes-by-backprop; one decimal, ± as printed). Published: PBP and DE from "
    "Lakshminarayanan et al. 2017 (Table 1); MCD'16 Gal & Ghahramani 2016; MCD'18 the tuned re-run "
    "in the README of the DropoutUncertaintyExps repository (10x epochs, grid search); DVI Wu et al. "
    "2019 (heteroscedastic, its own 20 random 90/10 splits, marked †). All as listed in "
    "`shared/docs/ANCHORS.md`."
)
#: our methods whose standing against the anchors is reported
FOCUS = ("bp", "bp-ng")


def _fmt(x: float, se: float | None = None, *, ll: bool) -> str:
    if not math.isfinite(x):
        return "n/a"
    if ll:
        v = f"{x:.2f}"
        return v if se is None else f"{v} ± {se:.2f}"
    v = f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"
    return v if se is None else f"{v} ± {se:.2g}"


def _standing(ours: float, ref: float, ref_digits: int, higher_better: bool) -> str:
    """``ahead`` / ``behind`` / ``tie`` of ``ours`` against ``ref`` (printed to ``ref_digits`` decimals)."""
    if round(ours, ref_digits) == round(ref, ref_digits):
        return "tie"
    better = ours > ref if higher_better else ours < ref
    return "**ahead**" if better else "behind"


def _best_published(row: dict[str, float], higher_better: bool) -> tuple[str, float]:
    name = (max if higher_better else min)(row, key=lambda k: row[k])
    return name, row[name]


def uci_tables(summary: dict[tuple[str, str], dict[str, float]], methods: Sequence[str]) -> dict[str, str]:
    """Markdown tables ``{"ll": ..., "rmse": ..., "standing": ..., "time": ...}`` from
    :func:`dualflow.experiments.uci.summarize`."""
    from dualflow.experiments.data.uci import TABLE2

    datasets = [d for d in TABLE2 if any((d, m) in summary for m in methods)]
    datasets += sorted({d for d, _ in summary} - set(datasets))
    out: dict[str, str] = {}
    for metric, higher in (("ll", True), ("rmse", False)):
        pub_tab = PUBLISHED_LL if metric == "ll" else PUBLISHED_RMSE
        pub_names = list(next(iter(pub_tab.values())))
        head = ["data", *[f"ours: {m}" for m in methods], "paper BP", "paper DE", "paper Reparam"]
        head += [f"{p}{' †' if p == 'DVI' else ''}" for p in pub_names]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for d in datasets:
            cells: list[tuple[float | None, str]] = []
            for m in methods:
                r = summary.get((d, m))
                if r is None:
                    cells.append((None, "–"))
                else:
                    cells.append((r[metric], _fmt(r[metric], r[f"{metric}_se"], ll=metric == "ll")))
            paper = PAPER_TABLE2.get(d, {})
            for pm in ("BP", "DE", "Reparam"):
                if pm not in paper:
                    cells.append((None, "–"))
                    continue
                v, sd = (paper[pm][0], paper[pm][1]) if metric == "ll" else (paper[pm][2], paper[pm][3])
                if metric == "rmse" and (d, pm) in PAPER_RMSE_TYPOS:
                    cells.append((None, f"{v:.0f} ± {sd:.0f} (typo)"))
                else:
                    cells.append((v, f"{v:.1f} ± {sd:.1f}"))
            for p in pub_names:
                v = pub_tab.get(d, {}).get(p)
                cells.append((v, "–" if v is None else f"{v:.2f}"))
            vals = [v for v, _ in cells if v is not None and math.isfinite(v)]
            best = (max if higher else min)(vals) if vals else None
            row = [d] + [f"**{s}**" if v is not None and v == best else s for v, s in cells]
            lines.append("| " + " | ".join(row) + " |")
        out[metric] = "\n".join(lines)

    # where bp / bp-ng stand against the paper's BP and the best published figure
    focus = [m for m in FOCUS if m in methods] or list(methods[:1])
    head = ["data"]
    for m in focus:
        head += [f"{m} LL vs paper BP", f"{m} LL vs best published", f"{m} RMSE vs best published"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in datasets:
        row = [d]
        for m in focus:
            r = summary.get((d, m))
            if r is None or d not in PUBLISHED_LL:
                row += ["–", "–", "–"]
                continue
            pbp = PAPER_TABLE2[d]["BP"][0]
            row.append(f"{_standing(r['ll'], pbp, 1, True)} ({r['ll'] - pbp:+.2f})")
            name, ref = _best_published(PUBLISHED_LL[d], True)
            row.append(f"{_standing(r['ll'], ref, 2, True)} ({r['ll'] - ref:+.2f} vs {name})")
            name, ref = _best_published(PUBLISHED_RMSE[d], False)
            row.append(f"{_standing(r['rmse'], ref, 2, False)} ({r['rmse'] - ref:+.2g} vs {name})")
        lines.append("| " + " | ".join(row) + " |")
    out["standing"] = "\n".join(lines)

    head = ["data", *[f"{m}: s/split" for m in methods], "total (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    grand = 0.0
    for d in datasets:
        row, tot = [d], 0.0
        for m in methods:
            r = summary.get((d, m))
            row.append("–" if r is None else f"{r['seconds'] / r['n']:.1f}")
            tot += 0.0 if r is None else r["seconds"]
        grand += tot
        row.append(f"{tot / 60:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| all | " + " | ".join("" for _ in methods) + f" | {grand / 60:.1f} |")
    out["time"] = "\n".join(lines)
    return out


def uci_plot(summary: dict[tuple[str, str], dict[str, float]], methods: Sequence[str], path: str) -> None:
    """Test LL and RMSE per data set: our methods (mean ± s.e.) with the paper's BP and the best
    published figure as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dualflow.experiments.data.uci import TABLE2

    datasets = [d for d in TABLE2 if any((d, m) in summary for m in methods)]
    datasets += sorted({d for d, _ in summary} - set(datasets))
    n = max(1, len(datasets))
    fig, axes = plt.subplots(2, n, figsize=(2.3 * n + 1, 6.5), squeeze=False)
    for j, d in enumerate(datasets):
        for i, (metric, higher) in enumerate((("ll", True), ("rmse", False))):
            ax = axes[i][j]
            for k, m in enumerate(methods):
                r = summary.get((d, m))
                if r is not None:
                    ax.errorbar(
                        [k],
                        [r[metric]],
                        yerr=[r[f"{metric}_se"]],
                        fmt="o",
                        ms=5,
                        capsize=3,
                        color=f"C{k % 10}",
                    )
            if d in PAPER_TABLE2 and not (metric == "rmse" and (d, "BP") in PAPER_RMSE_TYPOS):
                v = PAPER_TABLE2[d]["BP"][0 if metric == "ll" else 2]
                ax.axhline(v, color="k", ls="--", lw=1, label="paper BP")
            pub = (PUBLISHED_LL if metric == "ll" else PUBLISHED_RMSE).get(d)
            if pub:
                name, v = _best_published(pub, higher)
                ax.axhline(v, color="tab:red", ls=":", lw=1.5, label="best published")
                ax.annotate(
                    name,
                    (1.0, v),
                    xycoords=("axes fraction", "data"),
                    ha="right",
                    va="bottom",
                    fontsize=6,
                    color="tab:red",
                )
            ax.set_xlim(-0.5, len(methods) - 0.5)
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels(methods, rotation=60, fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_title(d if i == 0 else "", fontsize=9)
            if j == 0:
                ax.set_ylabel("test LL (higher better)" if metric == "ll" else "test RMSE (lower better)")
            if i == 0 and j == 0:
                ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _uci_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", nargs="+", required=True, help="JSON record file(s) of `dualflow uci`")
    p.add_argument("--out", default="results/uci/README.md", help="Markdown file to write")
    p.add_argument("--plot", default=None, help="PNG path (default: uci.png beside --out)")
    p.add_argument(
        "--notes",
        default=None,
        help="Markdown appended as the discussion (default: notes.md beside --out, if it exists)",
    )


def render_uci(
    records: list[dict[str, Any]],
    metas: list[dict[str, Any]],
    plot_name: str,
    notes: str = "",
    report_command: str = "dualflow report uci",
) -> str:
    """The README text of the UCI benchmark."""
    from dualflow.experiments import uci

    summary = uci.summarize(records)
    present = {m for _, m in summary}
    methods = [m for m in uci.METHODS if m in present] + sorted(present - set(uci.METHODS))
    t = uci_tables(summary, methods)
    commands = sorted(
        {c for m in metas for c in [*m.get("previous_commands", []), m.get("command", "")] if c}
    )
    versions = next((m["versions"] for m in metas if "versions" in m), records[0].get("versions", {}))
    n_splits = sorted({(r["dataset"], int(r["split"])) for r in records})
    parts = [
        "# UCI regression benchmark (the paper's Table 2)",
        "",
        "Test log-likelihood (LL, per point, higher is better) and test RMSE (lower is better) in the "
        "original target units, mean ± standard error over the standard splits (20; protein 5). "
        f"{len(records)} records, {len(n_splits)} (data set, split) pairs, methods: {', '.join(methods)}.",
        "",
        "Made by:",
        "",
        "```bash",
        *(commands or ["(command not recorded)"]),
        report_command,
        "```",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}.",
        "",
        "## Test log-likelihood",
        "",
        t["ll"],
        "",
        "## Test RMSE",
        "",
        t["rmse"],
        "",
        "Bold: best in the row (ours, the paper's and the published figures alike). " + SOURCES,
        "",
        "## Where bp / bp-ng stand",
        "",
        "Against the paper's BP column (one decimal, so `tie` means equal after rounding to it) and the "
        "best published figure in the row (any method, DVI included).",
        "",
        t["standing"],
        "",
        f"![UCI results]({plot_name})",
        "",
        "## Protocol",
        "",
        uci.protocol_markdown(),
        "",
        "## Time",
        "",
        "Wall time per split (hyperparameter search included) and in total, one core per job.",
        "",
        t["time"],
        "",
    ]
    if notes:
        parts += [notes.rstrip(), ""]
    return "\n".join(parts)


def _uci_run(args: argparse.Namespace) -> int:
    from dualflow.experiments import uci

    records, metas = uci.load_results(args.results)
    if not records:
        raise ValueError("no records in " + ", ".join(args.results))
    out = Path(args.out)
    plot = Path(args.plot) if args.plot else out.with_name("uci.png")
    notes_path = Path(args.notes) if args.notes else out.with_name("notes.md")
    if args.notes and not notes_path.is_file():
        raise FileNotFoundError(f"notes file not found: {notes_path}")
    notes = notes_path.read_text() if notes_path.is_file() else ""
    cmd = f"dualflow report uci --results {' '.join(args.results)} --out {args.out}"
    text = render_uci(records, metas, os.path.relpath(plot, out.parent), notes, cmd)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    summary = uci.summarize(records)
    methods = [m for m in uci.METHODS if any(k[1] == m for k in summary)]
    methods += sorted({m for _, m in summary} - set(methods))
    uci_plot(summary, methods, str(plot))
    print(f"wrote {out} and {plot}")
    return 0


#: name -> report (an explicit registry; add e.g. "classify" here)
REPORTS: dict[str, Report] = {
    "uci": Report(
        help="UCI table (ours vs the paper's Table 2 vs published anchors) and plot",
        add_arguments=_uci_arguments,
        run=_uci_run,
    ),
    "classify": Report(*importlib.import_module("dualflow.experiments.commands.classify").REPORT),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="report", metavar="REPORT")
    for name, rep in REPORTS.items():
        rep.add_arguments(sub.add_parser(name, help=rep.help, description=rep.help))


def run(args: argparse.Namespace) -> int:
    from dualflow.experiments.io import check_writable, require_extra

    if not getattr(args, "report", None):
        raise ValueError(f"name a report: {', '.join(REPORTS)}")
    # every report writes --out (and some a --plot): check before reading any record
    check_writable(getattr(args, "out", None), option="--out")
    if args.report == "uci":
        plot = args.plot or Path(args.out).with_name("uci.png")
        check_writable(plot, option="--plot" if args.plot else "--out (uci.png beside it)")
        require_extra("plot", purpose="dualflow report uci (plot)")
    return REPORTS[args.report].run(args)
