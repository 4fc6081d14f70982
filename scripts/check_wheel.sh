#!/usr/bin/env bash
# The package as users get it: build the sdist and the wheel (from the sdist) with
# `python -m build`, install the wheel into a fresh virtual environment that has only torch,
# and use the installed `medlatent` away from the checkout: --version (the one in
# src/medlatent/__init__.py), `data list`, a 1-step pretraining on a tiny .npz written here,
# `probe` and `embed`. Called by .ci/run after the tests; `make wheel-test` runs it alone.
#
#   VENV      the project's environment, used to run `build` (default .venv; `build` is
#             installed into it when missing)
#   PYTHON    the interpreter the fresh environment is made from (default python3)
#   TORCH     what is installed first (default torch==2.13.0, as the Makefile pins it)
#   KEEP=1    keep the work folder (printed) instead of removing it
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
work=$(mktemp -d "${TMPDIR:-/tmp}/medlatent-wheel.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "work folder: $work"; else trap 'rm -rf "$work"' EXIT; fi
step() { echo "check_wheel: $* ($(( $(date +%s) - start )) s)"; }
fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }

want=$(sed -n 's/^__version__ = "\([^"]*\)".*/\1/p' src/medlatent/__init__.py)
[ -n "$want" ] || fail "no __version__ = \"...\" line in src/medlatent/__init__.py"
cited=$(sed -n 's/^version: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' CITATION.cff)
[ "$cited" = "$want" ] || fail "CITATION.cff says version '$cited', src/medlatent/__init__.py says $want"

step "building sdist and wheel of $want"
[ -x "$VENV/bin/python" ] || fail "$VENV/bin/python not found (run make setup, or set VENV)"
"$VENV/bin/python" -c "import build" 2>/dev/null || "$VENV/bin/pip" install --quiet build
"$VENV/bin/python" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; fail "python -m build"; }
if grep -i "warning.*deprecat" "$work/build.log"; then fail "the build warns (above)"; fi
wheel=$(ls "$work/dist"/medlatent-"$want"-py3-none-any.whl 2>/dev/null) || fail "no medlatent-$want wheel in $work/dist: $(ls "$work/dist")"

step "fresh environment: $TORCH, then the wheel"
"$PYTHON" -m venv "$work/venv"
bin="$work/venv/bin"
{ "$bin/pip" install --quiet "$TORCH" && "$bin/pip" install --quiet "$wheel"; } >"$work/install.log" 2>&1 \
    || { grep -v "^WARNING: Location" "$work/install.log" | tail -30; fail "pip install"; }

cd "$work"  # away from the checkout: only the installed package can be imported
where=$("$bin/python" -c "import medlatent; print(medlatent.__file__)")
case "$where" in "$work/venv/"*) ;; *) fail "medlatent imported from $where, not from the fresh environment";; esac

step "smoke test of the installed medlatent"
out=$("$bin/medlatent" --version)
[ "$out" = "medlatent, version $want" ] || fail "medlatent --version said '$out', expected version $want"
export MEDLATENT_DATA=${MEDLATENT_DATA:-$work/data}
out=$("$bin/medlatent" data list 2>&1) || { echo "$out"; fail "medlatent data list"; }
grep -q bloodmnist <<<"$out" || { echo "$out"; fail "medlatent data list does not list bloodmnist"; }
"$bin/python" - <<'EOF'
import numpy as np
rng = np.random.default_rng(0)
arrays = {}
for split in ("train", "val", "test"):
    y = np.repeat([0, 1], 8)[:, None]
    x = rng.integers(0, 60, (16, 28, 28)).astype(np.uint8)
    x[y[:, 0] == 1, :, 10:18] += 150  # class 1: a bright band, so the probe has something to find
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
np.savez("tiny.npz", **arrays)
EOF
"$bin/medlatent" pretrain --data tiny.npz --epochs 1 --batch-size 16 --output run >pretrain.log 2>&1 \
    || { tail -20 pretrain.log; fail "medlatent pretrain"; }
"$bin/python" -c 'import json, sys; sys.exit(json.load(open("run/encoder_step.json"))["step"] != 1)' \
    || fail "pretraining did not stop after its one step: $(cat run/encoder_step.json)"
"$bin/medlatent" probe run >probe.log 2>&1 || { tail -20 probe.log; fail "medlatent probe"; }
[ -f run/probe.json ] || fail "medlatent probe wrote no run/probe.json"
"$bin/medlatent" embed run >/dev/null 2>&1 || fail "medlatent embed"
[ -f run/embeddings-test.npz ] && [ -f run/embeddings-test.csv ] || fail "medlatent embed wrote no .npz and .csv"
step "wheel check passed: $(basename "$wheel")"
