#!/usr/bin/env bash
# Install specsplit with the right torch build: CPU here, CUDA on a GPU host.
# An unpinned `torch` would pull gigabytes of CUDA wheels onto CPU machines, so torch is
# installed first, pinned, and the project after it (its range admits that torch).
#   scripts/install.sh          # runtime + dev tools (tests, lint, benchmarks)
#   scripts/install.sh runtime  # runtime only (containers)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${SPECSPLIT_TORCH_VERSION:-2.13.0}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==${TORCH_VERSION}"
fi
if [ "${1:-dev}" = "runtime" ]; then
  $PY -m pip install -q -e .
else
  $PY -m pip install -q -e ".[dev]"
fi
$PY -c "import torch, transformers, grpc; print(f'specsplit installed: torch {torch.__version__}, transformers {transformers.__version__}, grpcio {grpc.__version__}')"
