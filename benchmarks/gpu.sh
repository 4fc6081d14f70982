#!/usr/bin/env bash
# Runs on a lent GPU machine (device tool): GPU throughput of views and the SimCLR step, then
# SimCLR pretraining + probes on BloodMNIST and PneumoniaMNIST with a full-width ResNet-18.
# Expects the MONAI wheel in .whl/ and the MedMNIST files in .gpudata/ (carried with the call).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MEDLATENT_DATA=$PWD/.gpudata
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)" | tee -a "$OUT/gpu.txt"
python3 benchmarks/views_and_step.py --device cuda --backbone resnet18 --batch 512 --workers 2,16 \
    --out "$OUT/views_and_step_gpu.json" 2>&1 | tail -20 | tee "$OUT/views_and_step_gpu.txt"
for spec in "bloodmnist 100" "pneumoniamnist 200"; do
  set -- $spec
  python3 benchmarks/pretrain_probe.py --method simclr --data "$1" --backbone resnet18 --epochs "$2" --batch-size 512 \
      --budget-min 4 --set train.checkpoint_every=100000 --out-dir /tmp/sim 2>&1 | tail -2 | tee "$OUT/simclr_$1_gpu.txt"
  cp /tmp/sim/simclr_$1.json "$OUT/simclr_$1_gpu.json"
done
