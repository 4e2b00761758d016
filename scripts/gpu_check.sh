#!/usr/bin/env bash
# The GPU check of issue #6, on a CUDA machine, in a few minutes: syncstep against a hand-written loop on
# one GPU (small CNN, small transformer; fp32, bf16-mixed, 16-mixed), dp on all GPUs and DDP with NCCL
# against a one-GPU reference. Prints a Markdown table; writes JSON to --out FILE (or $OUT).
#
#   scripts/gpu_check.sh [--out gpu_check.json] [--quick]
#
# Runs the syncstep of this checkout (src/), with the python of $PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m syncstep.tools.gpu_check "$@"
