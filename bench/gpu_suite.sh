#!/usr/bin/env bash
# The GPU check of issue #21: one table (text-to-image eager / compiled / CUDA graphs, decode tokens/s,
# training samples/s and MFU, peak memory bf16 / int8 / offload, LoRA step memory, tests/test_cuda.py),
# inside 8 minutes on one H100 / H200. See bench/gpu_suite.py for the rows.
#
#   bash bench/gpu_suite.sh            # on a GPU machine
#   bash bench/gpu_suite.sh --cpu      # the reduced run on the CPU (about a minute)
#
# Python: $PYTHON, else the checkout's .venv, else python3; without an installed cheers, src/ is used.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi
if ! "$py" -c "import cheers" >/dev/null 2>&1; then
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$py" bench/gpu_suite.py "$@"
