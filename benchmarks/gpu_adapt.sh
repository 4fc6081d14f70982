#!/usr/bin/env bash
# Runs on a lent GPU machine (device tool): MAE ViT-tiny pretraining on one MedMNIST subset, then
# every adaptation strategy at 10 % and 100 % labels from it, then the MIL benchmark; results
# come back as one archive. Expects the MONAI wheel in .whl/ and the data in .gpudata/.
#   bash benchmarks/gpu_adapt.sh DATA MAE_EPOCHS MAE_BUDGET_MIN MIL_POSITIVE_CLASS [ADAPT_EPOCHS [FRACTION[,FRACTION] STRATEGY ...]]
# ADAPT_EPOCHS defaults to 5 (0: no adaptation, MIL only); with strategies given, only those run,
# at the given label fractions. Calls for several data sets can follow each other in one command.
set -uo pipefail
D=$1; EPOCHS=$2; BUDGET=$3; POSITIVE=$4; ADAPT_EPOCHS=${5:-5}
SELECT=(); if [ $# -ge 7 ]; then SELECT=(--fractions ${6//,/ } --strategies "${@:7}"); fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MEDLATENT_DATA=$PWD/.gpudata
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu_$D.txt"
timeout 230 python3 benchmarks/pretrain_probe.py --method mae --backbone vit-tiny --data "$D" --epochs "$EPOCHS" \
    --budget-min "$BUDGET" --batch-size 512 --out-dir /tmp/b_$D --keep-run --set train.checkpoint_every=100000 \
    | tee -a "$OUT/gpu_$D.txt"
RUN=$(ls -d /tmp/b_$D/run-mae-* | head -1)
[ "$ADAPT_EPOCHS" = 0 ] || timeout 330 python3 benchmarks/adapt_strategies.py --run "$D=$RUN" --epochs "$ADAPT_EPOCHS" --min-steps 200 "${SELECT[@]}" --device cuda --in-process \
    --out-dir /tmp/adapt_$D | tee -a "$OUT/gpu_$D.txt"
timeout 120 python3 benchmarks/mil.py --run "$D=$RUN:$POSITIVE" --device cuda --out-dir /tmp/mil_$D | tee -a "$OUT/gpu_$D.txt"
mkdir -p /tmp/adapt_$D; cp /tmp/b_$D/mae_"$D".json /tmp/adapt_$D/ 2>/dev/null
tar czf "$OUT/results_$D.tgz" -C /tmp adapt_$D mil_$D
