#!/usr/bin/env bash
# Create (or update) what the deployments in prefect.yaml expect on the Prefect server PREFECT_API_URL points at:
#   - process work pools `cpu` and `cuda` (names: $LORAKIT_CPU_POOL / $LORAKIT_CUDA_POOL),
#   - a tag concurrency limit `gpu` = $LORAKIT_GPU_SLOTS (default 1): at most that many training/quantization
#     tasks hold a GPU at once, whatever the number of workers,
#   - the LocalFileSystem block `lorakit-results` at $LORAKIT_RESULTS (default ~/.cache/lorakit/prefect-results)
#     where every flow run persists results, so the release flow can read what the GPU flows return.
# Idempotent: re-running updates the same objects.
set -euo pipefail
CPU_POOL=${LORAKIT_CPU_POOL:-cpu}
CUDA_POOL=${LORAKIT_CUDA_POOL:-cuda}
GPU_SLOTS=${LORAKIT_GPU_SLOTS:-1}
RESULTS=${LORAKIT_RESULTS:-${LORAKIT_HOME:-$HOME/.cache/lorakit}/prefect-results}
PYTHON=${PYTHON:-python}

prefect work-pool create "$CPU_POOL" --type process --overwrite >/dev/null
prefect work-pool create "$CUDA_POOL" --type process --overwrite >/dev/null
prefect concurrency-limit delete gpu >/dev/null 2>&1 || true
prefect concurrency-limit create gpu "$GPU_SLOTS" >/dev/null
mkdir -p "$RESULTS"
"$PYTHON" - "$RESULTS" <<'PY'
import sys
from prefect.filesystems import LocalFileSystem
LocalFileSystem(basepath=sys.argv[1]).save("lorakit-results", overwrite=True)
PY
echo "work pools: $CPU_POOL, $CUDA_POOL; tag limit gpu=$GPU_SLOTS; result storage local-file-system/lorakit-results -> $RESULTS"
