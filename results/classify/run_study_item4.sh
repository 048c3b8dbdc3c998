#!/usr/bin/env bash
# The CPU study of issue 11 item 4 with the recipe of results/classify/research.md: the five
# Table-1 configurations on MNIST (full training set, the last 10 000 images held out for
# validation; MLP 784-400-400-10 and LeNet-5, 30 epochs) and CIFAR-10 (JPEG q75 copy; full
# training set, the last 5 000 held out; ResNet-8, EPOCHS_CIFAR epochs), one seed, one core
# per run, two runs at a time (JOBS). Resumable (--workdir/--resume): rerun to continue.
# Then the report (results/classify/README.md).
#
#   results/classify/run_study_item4.sh                 # everything (estimated ~2 h of the 2 cores, see research.md)
#   ONLY=mnist-mlp results/classify/run_study_item4.sh  # one block: mnist-mlp, mnist-lenet5 or cifar10-resnet8
#   results/classify/run_study_item4.sh --list          # print the commands only
#   EXTRA="--limit-train 512 --val 128" EPOCHS_MNIST=1 OUT=/tmp/o WORK=/tmp/w REPORT=/tmp/o/README.md \
#     results/classify/run_study_item4.sh               # a smoke run (EXTRA overrides the options before it)
#
# LeNet-5 is not in the model registry of this branch: every command runs through
# `scripts/research_classify.py run` (`dualflow classify` with `lenet5` registered).
#
# Recipe (chosen on validation data, research.md sections 1-6):
#   vanilla NN      BatchNorm, SGD Nesterov 0.9, lr 0.1, weight decay 5e-4
#   reparam.        BatchNorm, Adam 1e-3, prior N(0, 0.05)
#   reparam./NF+NG+ensemble  no normalisation, natural gradient (lr 0.1, damping 0.1), 4 samples,
#                   prior N(0, 0.05), Adam 1e-3 for point parameters
#   BP/NF           no normalisation, Adam 1e-3, prior N(0, 0.05), weight variances held for the
#                   first third of the epochs (the objective is Eq. 2 throughout)
#   BP/NF+NG        no normalisation, natural gradient (lr 0.1, damping 0.1, b2 1e-4), prior N(0, 0.05)
# all: cosine annealing to 0, batch 128, KL weight 1 (Eq. 2, untempered); CIFAR: crop-flip,
# Adam-trained configurations lr 3e-3.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
DF=("$PY" scripts/research_classify.py run)
OUT=${OUT:-results/classify/study-item4}
WORK=${WORK:-runs/classify-item4}
JOBS=${JOBS:-2}
EPOCHS_MNIST=${EPOCHS_MNIST:-30}
EPOCHS_CIFAR=${EPOCHS_CIFAR:-10}
ONLY=${ONLY:-}
REPORT=${REPORT:-results/classify/README.md}
COMMON=(--threads 1 --samples 8 --seed 0 --quiet)
EXTRA=${EXTRA:-}

recipe() {  # method epochs -> the method's options
  local hold
  hold=$(( $2 / 3 ))
  case "$1" in
    vanilla) echo "" ;;
    reparam) echo "--prior-var 0.05" ;;
    reparam-ng-ensemble) echo "--prior-var 0.05 --ng-opt damping=0.1" ;;
    bp) echo "--prior-var 0.05 --vi-opt hold_epochs=$hold" ;;
    bp-ng) echo "--prior-var 0.05 --ng-opt damping=0.1 --ng-opt b2=0.0001" ;;
  esac
}

commands() {  # the slowest configurations first, so that both cores stay busy to the end
  local m
  for m in reparam-ng-ensemble bp-ng bp reparam vanilla; do
    if [[ -z "$ONLY" || "$ONLY" == mnist-mlp ]]; then
      echo "${DF[*]} --dataset mnist --arch mlp --method $m --epochs $EPOCHS_MNIST --val 10000" \
        "$(recipe "$m" "$EPOCHS_MNIST") ${COMMON[*]} $EXTRA --workdir $WORK/mnist-mlp-$m --resume" \
        "--out $OUT/mnist-mlp-$m.json"
    fi
    if [[ -z "$ONLY" || "$ONLY" == mnist-lenet5 ]]; then
      echo "${DF[*]} --dataset mnist --arch lenet5 --method $m --epochs $EPOCHS_MNIST --val 10000" \
        "$(recipe "$m" "$EPOCHS_MNIST") ${COMMON[*]} $EXTRA --workdir $WORK/mnist-lenet5-$m --resume" \
        "--out $OUT/mnist-lenet5-$m.json"
    fi
    if [[ -z "$ONLY" || "$ONLY" == cifar10-resnet8 ]]; then
      local lr="--lr 3e-3"
      [[ $m == vanilla ]] && lr=""
      echo "${DF[*]} --dataset cifar10 --arch resnet8 --method $m --epochs $EPOCHS_CIFAR --val 5000 $lr" \
        "$(recipe "$m" "$EPOCHS_CIFAR") ${COMMON[*]} $EXTRA --workdir $WORK/cifar10-resnet8-$m --resume" \
        "--out $OUT/cifar10-resnet8-$m.json"
    fi
  done
}

if [[ "${1:-}" == --list ]]; then commands; exit 0; fi
commands | xargs -P "$JOBS" -I{} bash -c '{}'

"$PY" -c "from dualflow.experiments.classify import report_classify as r; r(['$OUT'], '$REPORT')"
