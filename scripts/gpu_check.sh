#!/usr/bin/env bash
# The prepared GPU check (docs/gpu_check.md): NF4 training, GPTQ and AWQ on the device, the gate's kernel path vs
# the dequantized path, and the release flow routed to a `cuda` pool worker, on tiny models made in code.
# Prints one JSON summary on stdout (progress on stderr); exit 0 only when every check passed.
#   scripts/gpu_check.sh                      # on a GPU machine (default --device cuda, at most 9 min)
#   scripts/gpu_check.sh --device cpu         # what CI runs (tests/test_gpu_check.py)
#   scripts/gpu_check.sh --write-results      # a GPU run's summary into bench/results/gpu_check.json
# Python: $PYTHON, else this checkout's .venv, else python3. lorakit is imported from this checkout (PYTHONPATH),
# so nothing needs installing; wheels carried in .whl/ are installed into a temporary folder by the script.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py "$@"
