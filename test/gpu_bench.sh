#!/usr/bin/env bash
# The training step on one CUDA GPU against timm, eager then compiled (under 5 minutes on an H100):
# efficientnetv2_rw_t at 288 px, batch 256, bfloat16 autocast, channels_last, synthetic data.
# Targets: >= 2,500 images/s and >= 1.2x timm. Tables go to stdout, JSON to test/output/.
#
#   bash test/gpu_bench.sh                 # from the repo root or from test/
#   PYTHON=/path/to/python bash test/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c 'import sys, torch, timm; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: needs torch with a visible CUDA GPU and timm (pip install -r requirements-test.txt)" >&2
    exit 1
fi
mkdir -p test/output
common=(--device cuda --model efficientnetv2_rw_t --img-size 288 -b 256 --precision bfloat16
        --channels-last on --no-pipeline --compare-timm --warmup 10 --windows 5 --steps 10)
echo "== eager"
"$PYTHON" bench.py "${common[@]}" --json test/output/gpu_bench_eager.json
echo
echo "== torch.compile (compilation is in the warm-up, not in images/s)"
"$PYTHON" bench.py "${common[@]}" --compile --json test/output/gpu_bench_compile.json
