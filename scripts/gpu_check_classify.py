"""One short CUDA check of `dualflow classify` (run on a GPU machine; no real data needed).

Writes synthetic arrays in the MNIST and CIFAR layouts to a temporary folder, then trains
one epoch of a few configurations on CUDA with and without bf16 autocast, and compares the
output moments of a Bayesian ResNet-20 under bf16 autocast (with the fp32 moment-rule
hooks) against float32. Prints one JSON document (and writes it to ``$OUT`` if set).

    PYTHONPATH=src python3 results/classify/gpu_check.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from dualflow import losses, models, train
from dualflow.experiments import classify as C


def fake_data(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name, shape in (("mnist", (28, 28)), ("cifar10", (32, 32, 3))):
        d = root / name
        d.mkdir(parents=True)
        for split, n in (("train", 4096), ("test", 2000)):
            x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
            y = rng.integers(0, 10, n).astype(np.int64)
            np.savez(d / f"{split}.npz", x=x, y=y)


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA"
    out: dict = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "runs": [],
        "moments": {},
    }
    root = Path(tempfile.mkdtemp())
    fake_data(root)
    cases = [
        ("mnist", "mlp", "bp", {}),
        ("mnist", "mlp", "vanilla", {}),
        ("cifar10", "resnet8", "bp", {}),
        ("cifar10", "resnet8", "vanilla", {}),
        ("cifar10", "resnet8", "reparam-ng-ensemble", {}),
        ("cifar10", "resnet20", "bp-ng", {}),
    ]
    for ds, arch, method, opts in cases:
        for amp in (False, True):
            cfg = C.ClassifyConfig(
                dataset=ds, arch=arch, method=method, epochs=1, limit_train=4096, batch_size=128,
                data_dir=str(root), device="cuda", amp=amp, samples=4, arch_options=opts,
            )  # fmt: skip
            t0 = time.perf_counter()
            rec = C.train_and_evaluate(cfg, None, log=None)
            out["runs"].append(
                {
                    "case": f"{ds}/{arch}/{method}",
                    "amp": amp,
                    "device": rec["device"],
                    "train_images_per_s": round(rec["train_images_per_second"], 1),
                    "test_nll": round(rec["test_nll"], 4),
                    "wall_s": round(time.perf_counter() - t0, 2),
                }
            )
            print(json.dumps(out["runs"][-1]), flush=True)
    torch.manual_seed(0)
    for arch in ("resnet20", "resnet56"):
        net = models.create(arch, normalization="none", bayes=True).cuda()
        x = torch.randn(64, 3, 32, 32, device="cuda")
        y = torch.randint(0, 10, (64,), device="cuda")
        with torch.no_grad():
            with train.tf32(False):
                ref = net(x)
            with train.tf32(True):
                tf32 = net(x)
            with train.mixed_precision(net, "cuda"):
                bf = net(x)
        res = {}
        for name, o in (("tf32", tf32), ("bf16", bf)):
            res[name] = {
                "rel_mean": float((o.mean - ref.mean).norm() / ref.mean.norm()),
                "max_rel_var": float(((o.var - ref.var).abs() / ref.var).max()),
                "d_nll": float(losses.categorical_nll(o, y) - losses.categorical_nll(ref, y)),
            }
        out["moments"][arch] = res
        print(arch, json.dumps(res), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
