#!/usr/bin/env bash
# The CPU-scale study of results/classify/README.md: the five Table-1 configurations on
# MNIST (MLP) and CIFAR-10 (JPEG q75 copy; ResNet-8 at half width), one seed, one core each,
# run one after the other; then the report. Resumable (--workdir/--resume): rerun to continue.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DUALFLOW_DATA=${DUALFLOW_DATA:-../shared/data}
DF=${DF:-.venv/bin/dualflow}
OUT=results/classify/study
COMMON=(--threads 1 --samples 8 --seed 0 --quiet)

for m in vanilla reparam reparam-ng-ensemble bp bp-ng; do
  $DF classify --dataset mnist --arch mlp --method "$m" --epochs 5 --limit-train 25000 --val 5000 \
    "${COMMON[@]}" --workdir "runs/classify/mnist-mlp-$m" --resume --out "$OUT/mnist-mlp-$m.json"
done
# Adam-trained configurations (and the NG methods' point parameters) use lr 3e-3 on CIFAR
# (bp probe on a validation split, see README); vanilla keeps SGD 0.1 / weight decay 5e-4.
for m in vanilla reparam reparam-ng-ensemble bp bp-ng; do
  lr=(--lr 3e-3); [[ $m == vanilla ]] && lr=()
  $DF classify --dataset cifar10 --arch resnet8 --arch-opt 'widths=[8,16,32]' --method "$m" --epochs 8 \
    --limit-train 12000 --val 2000 "${lr[@]}" "${COMMON[@]}" \
    --workdir "runs/classify/cifar10-resnet8w8-$m" --resume --out "$OUT/cifar10-resnet8w8-$m.json"
done
# the tempered-KL variant of BP/NF (not the paper's Eq. 2), for the KL discussion
$DF classify --dataset mnist --arch mlp --method bp --epochs 5 --limit-train 25000 --val 5000 --kl-weight 0.1 \
  "${COMMON[@]}" --workdir runs/classify/mnist-mlp-bp-kl0.1 --resume --out "$OUT/mnist-mlp-bp-kl0.1.json"
$DF classify --dataset cifar10 --arch resnet8 --arch-opt 'widths=[8,16,32]' --method bp --epochs 8 \
  --limit-train 12000 --val 2000 --lr 3e-3 --kl-weight 0.1 "${COMMON[@]}" \
  --workdir runs/classify/cifar10-resnet8w8-bp-kl0.1 --resume --out "$OUT/cifar10-resnet8w8-bp-kl0.1.json"

.venv/bin/python -c "from dualflow.experiments.classify import report_classify as r; r(['$OUT'], 'results/classify/README.md')"
