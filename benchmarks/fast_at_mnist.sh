#!/usr/bin/env bash
# FGSM-SDI vs FGSM-RS vs PGD-AT on the bundled MNIST (4000 train / 1000 val), same model, eps, epochs and
# schedule; then clean and PGD-20 accuracy of each last checkpoint on the whole validation split.
# Usage: benchmarks/fast_at_mnist.sh [OUT_DIR] [EPOCHS] [PGD_AT_STEPS]   (CPU: export OMP_NUM_THREADS=1 on a shared box)
set -euo pipefail
OUT=${1:-/tmp/fast_at_mnist}
EPOCHS=${2:-2}
PGD_STEPS=${3:-5}
PY=${PYTHON:-python}
COMMON=(--model resnet10t --epochs "$EPOCHS" -b 64 --lr 0.05 --sched cosine --warmup-epochs 0 --no-aug --smoothing 0
        --workers 0 --seed 0 --adv-eps 0.1 --adv-val-samples 256 --adv-co-guard --log-interval 20
        --output "$OUT")
declare -A FLAGS=([fgsm-sdi]="--adv-method fgsm-sdi" [fgsm-rs]="--adv-method fgsm-rs"
                  [pgd$PGD_STEPS]="--adv-method pgd --adv-steps $PGD_STEPS")
for name in fgsm-sdi fgsm-rs "pgd$PGD_STEPS"; do
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  $PY train.py "${COMMON[@]}" ${FLAGS[$name]} --experiment "$name" > "$OUT-$name.train.log" 2>&1
  echo "$name train wall-clock: $(echo "$(date +%s.%N) - $start" | bc) s"
  $PY validate.py --model resnet10t --checkpoint "$OUT/$name/last.pth.tar" --attack pgd --eps 0.1 --steps 20 \
      -b 250 --workers 0 --results-file "$OUT/$name/pgd20.json" --results-format json > "$OUT-$name.val.log" 2>&1
  echo "$name: $(tr -d '\n' < "$OUT/$name/pgd20.json")"
done
