#!/usr/bin/env bash
# Create .venv in the checkout (Python 3.11+) and install the package with its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned in pyproject.toml (torch==2.13.0, the CPU build on CPU-only machines).
.venv/bin/python -m pip install --quiet -e ".[test]"
