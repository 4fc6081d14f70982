#!/usr/bin/env bash
# Runs on a lent GPU machine (device tool): the self-supervised method table (ssl_methods.py)
# with a full-width ResNet-18 (batch 512) and ViT-tiny, for some methods, so that each call
# stays under the device's 10-minute limit. With two data sets (comma-separated) the two method
# sequences run side by side, one process each, sharing the GPU: each method then shares it with
# the same method on the other data set. Results come back as one archive (ssl_gpu_*.tgz).
# Expects the MONAI wheel in .whl/ and the data in .gpudata/ (carried with the call).
#   bash benchmarks/gpu_ssl.sh BUDGET_MIN DATA[,DATA] METHOD [METHOD ...]
#   e.g. bash benchmarks/gpu_ssl.sh 0.7 bloodmnist,pneumoniamnist simclr mocov2 mocov3 byol dino mae
set -uo pipefail
BUDGET=$1; DATASETS=$2; shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MEDLATENT_DATA=$PWD/.gpudata
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RES=/tmp/ssl_gpu; mkdir -p "$RES"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu_ssl.txt"
for D in ${DATASETS//,/ }; do
  timeout "${SSL_TIMEOUT:-540}" python3 benchmarks/ssl_methods.py --budget-min "$BUDGET" --data "$D" --methods "$@" \
      --resnet resnet18 --batch-size 512 --calibrate-s 8 --out-dir "$RES" > "$RES/log_$D.txt" 2>&1 &
done
wait
cat "$RES"/log_*.txt | tee -a "$OUT/gpu_ssl.txt"
tar czf "$OUT/ssl_gpu_$(echo "$@" | tr ' ' '-').tgz" -C "$RES" --exclude='run-*' --exclude='.calibrate-*' .
