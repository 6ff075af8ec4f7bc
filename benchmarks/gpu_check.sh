#!/usr/bin/env bash
# DAT at ImageNet scale on one GPU, in at most 8 minutes on an H100: the vq-f8 VQGAN (random weights: costs do
# not depend on them) at 224 px with ResNet-50 and ViT-B/16 at batch 32. Prints
#   * peak memory per image of a VQGAN encode / decode, fp32 and bf16, and the chunk that fits 20 GB
#     (benchmarks/vqgan_cost.py --memory);
#   * per model, the ours / reference / ideal step ratios, images per second and peak memory for the VQGAN in
#     fp32, bf16, channels_last and compiled (benchmarks/dat_cost.py; one process each, ratios within a run).
#
#   bash benchmarks/gpu_check.sh              # CUDA, 224 px, batch 32
#   bash benchmarks/gpu_check.sh --dry-run    # the same commands on CPU at 32 px, batch 2: checks the script works
#                                             # (about 25 min on a loaded 2-core CPU; the two compiled runs need
#                                             # more than their 10 min there and time out, as the budget intends)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [[ "${1:-}" == "--dry-run" ]]; then
    DEVICE=cpu SIZE=32 BATCH=2 REPEATS=1 WARMUP=0 BUDGET=1500 LIMIT=600
else
    DEVICE=cuda SIZE=224 BATCH=32 REPEATS=5 WARMUP=1 BUDGET=470 LIMIT=200
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: use --dry-run")' || exit 1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
START=$SECONDS

run() {  # one benchmark under a time limit; skipped once the budget is spent, so the whole check stays bounded
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 30)); then echo "### skipped (time budget spent): $*"; return; fi
    echo "### $*"
    timeout $((left < LIMIT ? left : LIMIT)) "$PY" "$@" || echo "### failed or timed out ($?): $*"
}

run benchmarks/vqgan_cost.py --vqgan vq-f8 --img-size "$SIZE" --batch-size 4 --memory --budget-gb 20 --device "$DEVICE"
COMMON=(--vqgan vq-f8 --random-vqgan --img-size "$SIZE" --batch-size "$BATCH" --num-classes 1000
        --repeats "$REPEATS" --warmup "$WARMUP" --device "$DEVICE")
MODELS=("--model resnet50" "--model vit_base_patch16_224 --model-kwargs img_size=$SIZE")
for model in "${MODELS[@]}"; do
    # shellcheck disable=SC2086  # $model is two or four words
    run benchmarks/dat_cost.py "${COMMON[@]}" $model --no-channels-last --memory
    run benchmarks/dat_cost.py "${COMMON[@]}" $model --no-channels-last --bf16
    run benchmarks/dat_cost.py "${COMMON[@]}" $model --channels-last
done
for model in "${MODELS[@]}"; do  # compilation takes minutes: last, inside what is left
    run benchmarks/dat_cost.py "${COMMON[@]}" $model --no-channels-last --compile
done
echo "### total $((SECONDS - START)) s"
