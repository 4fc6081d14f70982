#!/usr/bin/env bash
# Runs on a lent GPU machine (device tool): the self-supervised method table (ssl_methods.py)
# with a full-width ResNet-18 (batch 512) and ViT-tiny, for some methods on one data set, so
# that each call stays under the device's 10-minute limit; results come back as JSON files.
# Expects the MONAI wheel in .whl/ and the data in .gpudata/ (carried with the call).
#   bash benchmarks/gpu_ssl.sh BUDGET_MIN DATA METHOD [METHOD ...]
#   e.g. bash benchmarks/gpu_ssl.sh 0.75 bloodmnist simclr mocov2 mocov3 byol
set -uo pipefail
BUDGET=$1; D=$2; shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MEDLATENT_DATA=$PWD/.gpudata
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu_ssl_$D.txt"
python3 benchmarks/ssl_methods.py --budget-min "$BUDGET" --data "$D" --methods "$@" --resnet resnet18 \
    --batch-size 512 --out-dir "$OUT" | tee -a "$OUT/gpu_ssl_$D.txt"
