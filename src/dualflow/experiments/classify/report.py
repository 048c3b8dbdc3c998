"""The ``dualflow classify`` record (:func:`make_record`: its keys are what other tools
read), its learning-curve plot and the Markdown report (the paper's Table 1 beside ours)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dualflow import methods, models, train
from dualflow.experiments import distributed as ddist
from dualflow.experiments.classify.config import (
    PAPER_TABLE1,
    TABLE1_LABELS,
    TABLE1_METHODS,
    ClassifyConfig,
    Resolved,
    arch_family,
)
from dualflow.experiments.data.images import ImageData

__all__ = [
    "classify_history",
    "dataset_label",
    "load_records",
    "make_record",
    "plot_history",
    "report_classify",
]


def dataset_label(data: ImageData) -> str:
    label = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}.get(data.name, data.name)
    return f"{label} (JPEG q75 copy)" if data.lossy else label


def classify_history(records: list[dict[str, Any]], kl_weight_abs: float) -> list[dict[str, Any]]:
    """The loop's epoch records in the keys of classify records (cumulative train seconds)."""
    out, total = [], 0.0
    for e in records:
        total += e["seconds"]
        rec = {"epoch": e["epoch"], "lr": e["lr"], "train_loss": e["loss"], "train_nll": e["nll"]}
        rec.update(train_kl=e["kl"], train_kl_term=kl_weight_abs * e["kl"], train_error=e["error"])
        out.append({**rec, "train_seconds": total, **{k: v for k, v in e.items() if k.startswith("val_")}})
    return out


def make_record(
    cfg: ClassifyConfig,
    r: Resolved,
    data: ImageData,
    info: ddist.DistInfo,
    method: methods.Method,
    hist: train.History,
    test: dict[str, float],
    command: str | None,
) -> dict[str, Any]:
    """The JSON record (keys read by ``dualflow report classify`` and other tools)."""
    import dualflow

    n_train = int(data.y_train.shape[0])
    history = classify_history(hist.epochs, r.kl_weight_abs)
    t_train = history[-1]["train_seconds"] if history else 0.0
    rec: dict[str, Any] = {
        "dataset": cfg.dataset,
        "dataset_label": dataset_label(data),
        "arch": cfg.arch,
        "method": cfg.method,
        "config_label": TABLE1_LABELS.get(cfg.method, cfg.method),
        "normalization": r.normalization,
        **{f"test_{k}": test[k] for k in ("error", "nll", "ece", "brier")},
        "n_test": test["n"],
        "epochs": cfg.epochs,
        "seconds": None,  # set by the caller
        "train_seconds": t_train,
        "test_eval_seconds": None,
        "train_images_per_second": n_train * cfg.epochs / t_train if t_train > 0 else None,
        "n_train": n_train,
        "n_val": int(cfg.val),
        "optimizer": r.optimizer,
        "lr": r.lr,
        "weight_decay": r.weight_decay,
        "augment": list(r.augment),
        "kl_weight": cfg.kl_weight,
        "kl_weight_abs": r.kl_weight_abs,
        "ng_data_size": r.ng_data_size,
        "batch_size": cfg.batch_size,
        "global_batch_size": cfg.batch_size * info.world_size,
        "world_size": info.world_size,
        "device": str(info.device),
        "amp": "bf16 autocast (matmuls/convs; moment rules, BatchNorm, loss, KL in fp32)"
        if cfg.amp
        else "off",
        "parameters": models.count_parameters(method),
        "parameters_with_variances": models.count_parameters(method, include_variances=True),
        "seed": cfg.seed,
        "history": history,
        "config": asdict(cfg),
        "resumed": None if hist.resumed_from is None else "epoch {}, step {}".format(*hist.resumed_from),
        "command": command,
        "versions": {"dualflow": dualflow.__version__, "torch": torch.__version__},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if history and "val_error" in history[-1]:
        rec.update({k: history[-1][k] for k in ("val_loss", "val_error", "val_ece", "val_brier")})
    return rec


def plot_history(record: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Learning curves (loss and error per epoch, train and validation) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = record["history"]
    ep = [e["epoch"] for e in h]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(ep, [e["train_loss"] for e in h], "o-", label="train objective (NLL + KL term)")
    ax[0].plot(ep, [e["train_nll"] for e in h], "s--", label="train NLL (augmented batches)")
    ax[1].plot(ep, [e["train_error"] for e in h], "o-", label="train")
    if h and "val_loss" in h[0]:
        ax[0].plot(ep, [e["val_loss"] for e in h], "^-", label="validation NLL")
        ax[1].plot(ep, [e["val_error"] for e in h], "^-", label="validation")
    ax[1].axhline(record["test_error"], color="k", ls=":", label=f"test (final) {record['test_error']:.4f}")
    ax[0].set_xlabel("epoch")
    ax[1].set_xlabel("epoch")
    ax[0].set_ylabel("loss (nats / example)")
    ax[1].set_ylabel("error")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(
        f"{record.get('dataset_label', record['dataset'])}, {record['arch']} ({record['normalization']}), "
        f"{record['method']}",
        fontsize=9,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_records(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Records from JSON files (one record, or a list of them, per file; folders are searched
    for ``*.json``)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such result file or folder: {p}")
    out: list[dict[str, Any]] = []
    for f in files:
        try:
            obj = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not a JSON file of classify records ({e})") from e
        for rec in obj if isinstance(obj, list) else [obj]:
            if isinstance(rec, dict) and "test_error" in rec and "method" in rec:
                rec.setdefault("_file", str(f))
                out.append(rec)
    return out


def _order(row: str) -> tuple[int, str]:
    base = row.split(" ")[0]
    return (TABLE1_METHODS.index(base), row) if base in TABLE1_METHODS else (len(TABLE1_METHODS), row)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def report_classify(
    paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], notes: str | None = None
) -> str:
    """Markdown table of ``dualflow classify`` records beside the paper's Table 1.

    One table per (data set, architecture, training-set size, epochs): a row per method
    (Table-1 order; seeds averaged, their number shown) with test error %, NLL, ECE, Brier
    and minutes, plus the paper's error for the same architecture family where it has one
    (CIFAR-10/100 and Tiny ImageNet only; MNIST is not in Table 1). Then the paper's two
    claims checked on every table: ``BP/NF <= vanilla NN`` (error) and ``BP/NF+NG <= BP/NF``.

    Args:
        paths: JSON files or folders of records.
        out: Markdown file to write.
        notes: Markdown appended at the end (default: ``notes.md`` beside ``out``, if any).

    Returns:
        The Markdown text (also written to ``out``).
    """
    recs = load_records(paths)
    if not recs:
        raise ValueError("no classify records in " + ", ".join(map(str, paths)))
    groups: dict[tuple[str, str, int, int], dict[str, list[dict[str, Any]]]] = {}
    for r in recs:
        opts = (r.get("config") or {}).get("arch_options") or {}
        arch = r["arch"] + (f" ({', '.join(f'{k}={v}' for k, v in sorted(opts.items()))})" if opts else "")
        key = (r.get("dataset_label", r["dataset"]), arch, int(r.get("n_train", 0)), int(r["epochs"]))
        row = r["method"] + (f" (kl_weight {r['kl_weight']:g})" if r.get("kl_weight", 1.0) != 1.0 else "")
        groups.setdefault(key, {}).setdefault(row, []).append(r)
    lines = [
        "# Image classification (the paper's Table 1 configurations)",
        "",
        "Test error (%), NLL (nats per image), ECE (15 equal-width confidence bins) and multi-class "
        "Brier score (in [0, 2]) of the predictive distribution on the full test set; `minutes`: wall "
        "time of the run (training, per-epoch validation and test evaluation). Produced by "
        "`dualflow.experiments.classify.report_classify` from `dualflow classify` records.",
        "",
    ]
    claims = []
    for (label, arch, n, epochs), by_method in sorted(groups.items()):
        ds = next(iter(by_method.values()))[0]["dataset"]
        fam = arch_family(arch.split(" ")[0])
        paper = PAPER_TABLE1.get((ds, fam)) if fam else None
        lines += [
            f"## {label}, {arch}, {n} training images, {epochs} epochs",
            "",
            "| configuration | method | norm | seeds | test error % | NLL | ECE | Brier | minutes |"
            + (f" paper ({fam}, full scale) error % |" if paper else ""),
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if paper else ""),
        ]
        err: dict[str, float] = {}
        for m in sorted(by_method, key=_order):
            rs = by_method[m]
            e = _mean([x["test_error"] for x in rs])
            err[m] = e
            base = m.split(" ")[0]
            name = TABLE1_LABELS.get(base, base) + m[len(base) :]
            row = (
                f"| {name} | `{base}` | {rs[0].get('normalization', '?')} | {len(rs)} "
                f"| {100 * e:.2f} | {_mean([x['test_nll'] for x in rs]):.4f} "
                f"| {_mean([x['test_ece'] for x in rs]):.4f} | {_mean([x['test_brier'] for x in rs]):.4f} "
                f"| {_mean([x['seconds'] for x in rs]) / 60:.1f} |"
            )
            if paper:
                row += f" {paper[m]:.2f} |" if m in paper else " — |"  # tempered rows have none
            lines.append(row)
        lines.append("")
        if "bp" in err and "vanilla" in err:
            ok = err["bp"] <= err["vanilla"]
            claims.append(
                f"- {label}, {arch}: BP/NF {100 * err['bp']:.2f}% vs vanilla NN {100 * err['vanilla']:.2f}%: "
                f"claim 'BP/NF >= normalised point net' {'holds' if ok else 'does not hold'} here."
            )
        if "bp" in err and "bp-ng" in err:
            ok = err["bp-ng"] <= err["bp"]
            claims.append(
                f"- {label}, {arch}: BP/NF+NG {100 * err['bp-ng']:.2f}% vs BP/NF {100 * err['bp']:.2f}%: "
                f"claim 'NG helps' {'holds' if ok else 'does not hold'} here."
            )
    if claims:
        lines += ["## The paper's claims at this scale (test error, lower is better)", "", *claims, ""]
    cmds = sorted({r["command"] for r in recs if r.get("command")})
    if cmds:
        lines += ["## Commands", "", "```bash", *cmds, "```", ""]
    if notes is None:
        nf = Path(out).with_name("notes.md")
        notes = nf.read_text() if nf.is_file() else ""
    if notes:
        lines += [notes.rstrip(), ""]
    text = "\n".join(lines)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    return text
