#!/usr/bin/env bash
# One command for a GPU owner: a few hundred training steps of the paper's configuration
# (DenseNet-121 at 224, z 512, text block 384 wide; --text-width 768 for ClinicalBERT's) on
# synthetic tensors, in fp32 and in bf16 mixed precision, printing images per second for each.
#   benchmarks/gpu_smoke.sh                 # 300 steps of batch 32
#   benchmarks/gpu_smoke.sh --steps 100 --batch-size 64 --text-width 768
# Extra arguments go to benchmarks/gpu_smoke.py (see its --help). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" benchmarks/gpu_smoke.py --steps 300 "$@"
