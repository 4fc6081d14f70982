#!/usr/bin/env bash
# Runs on a lent GPU machine: the GPU test, SimCLR throughput of the training loop, and DINO and
# MAE ViT-tiny runs on BloodMNIST whose attention maps and reconstructions go in the README.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MEDLATENT_DATA=$PWD/.gpudata
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pytest -q -p no:cacheprovider tests/test_augment.py -k gpu 2>&1 | tail -2 | tee "$OUT/gpu_tests.txt"
P="python3 benchmarks/pretrain_probe.py --data bloodmnist --batch-size 512 --out-dir /tmp/b --keep-run"
$P --method simclr --backbone resnet18 --epochs 100 --budget-min 4 --set train.checkpoint_every=100000 | tee "$OUT/gpu_runs.jsonl"
$P --method dino --backbone vit-tiny --epochs 40 --budget-min 3 --set train.checkpoint_every=100000 | tee -a "$OUT/gpu_runs.jsonl"
$P --method mae --backbone vit-tiny --epochs 100 --budget-min 2.5 --set train.checkpoint_every=100000 | tee -a "$OUT/gpu_runs.jsonl"
python3 -m medlatent.cli.main attention /tmp/b/run-dino-* --n 6 --out "$OUT/attention_dino_vit_bloodmnist.png"
python3 -m medlatent.cli.main reconstruct /tmp/b/run-mae-* --n 8 --out "$OUT/reconstruction_mae_vit_bloodmnist.png"
cp /tmp/b/simclr_bloodmnist.json "$OUT/loop_simclr_bloodmnist_gpu.json"
cp /tmp/b/dino_bloodmnist.json /tmp/b/mae_bloodmnist.json "$OUT/"
