#!/usr/bin/env bash
# Install specsplit with the right torch build: CPU here, CUDA on a GPU host.
# An unpinned `torch` would pull gigabytes of CUDA wheels onto CPU machines, so torch is
# installed first, pinned, and the project after it (its range admits that torch).
# The dev install also fetches what the tests need beyond Python: the Node gRPC client of
# tests/services/test_node_client.py (`npm ci`, from the committed package-lock.json).
#   scripts/install.sh          # runtime + dev tools (tests, lint, benchmarks)
#   scripts/install.sh runtime  # runtime only (containers)
# SPECSPLIT_INSTALL_DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${SPECSPLIT_TORCH_VERSION:-2.13.0}
run() {
  if [ -n "${SPECSPLIT_INSTALL_DRY_RUN:-}" ]; then echo "+ $*"; else "$@"; fi
}
if [ -n "${SPECSPLIT_INSTALL_DRY_RUN:-}" ] || ! $PY -c "import torch" 2>/dev/null; then
  run $PY -m pip install -q "torch==${TORCH_VERSION}"
fi
if [ "${1:-dev}" = "runtime" ]; then
  run $PY -m pip install -q -e .
else
  run $PY -m pip install -q -e ".[dev]"
  if ! command -v npm >/dev/null; then
    echo "scripts/install.sh: npm is missing; the tests need Node.js >= 18 with npm (apt-get install nodejs npm)" >&2
    exit 1
  fi
  run npm ci --prefix tests/services/node --no-audit --no-fund --loglevel=error
fi
if [ -z "${SPECSPLIT_INSTALL_DRY_RUN:-}" ]; then
  $PY -c "import torch, transformers, grpc; print(f'specsplit installed: torch {torch.__version__}, transformers {transformers.__version__}, grpcio {grpc.__version__}')"
fi
