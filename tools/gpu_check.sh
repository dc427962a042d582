#!/usr/bin/env bash
# Where the project stands on one CUDA GPU, in one command of at most 8 minutes on an H100/H200:
# the CUDA tests (pytest -m cuda), train.py's images/s and peak memory with the reference recipe's
# flags (rw_t, 288 px, batch 256; bf16 and fp16; eager and --compile), bench.py against timm (eager
# and compiled), and whether a JPEG input pipeline keeps the GPU fed; one summary table at the end,
# with the project's goals marked met / not met. JSON and every stage's log: output/gpu_check/.
#
#   bash tools/gpu_check.sh              # from the repo root or from tools/
#   bash tools/gpu_check.sh --smoke      # every stage at toy sizes on whatever device is here (CPU too)
#   PYTHON=/path/to/python bash tools/gpu_check.sh
#
# Budgets per stage (seconds, 480 in all; the engine enforces them): environment 10, CUDA tests 120,
# train.py synthetic bf16 eager 40, fp16 eager 40, JPEG folder 15, train.py on the JPEGs 45,
# bench.py eager 45, train.py bf16 compiled 80, bench.py compiled 85; train.py fp16 compiled only
# with the time left over (>= 70). The stages themselves are in tools/gpu_check.py (its docstring).
# Exit status: 0 when every stage ran and no test failed (goals not met included), else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
smoke=0
for arg in "$@"; do [ "$arg" = --smoke ] && smoke=1; done
if [ "$smoke" = 0 ]; then
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' >/dev/null 2>&1
    status=$?
    if [ "$status" = 3 ]; then
        echo "gpu_check.sh needs a CUDA GPU: torch.cuda.is_available() is False on this machine (--smoke runs every stage at toy sizes on any device)" >&2
        exit 1
    elif [ "$status" != 0 ]; then
        echo "gpu_check.sh needs torch with a CUDA GPU: '$PYTHON -c \"import torch\"' fails here" >&2
        exit 1
    fi
fi
exec "$PYTHON" tools/gpu_check.py "$@"
