#!/usr/bin/env bash
# Set up .venv, then lint and run the whole pytest suite (tests needing ../shared/data or CUDA skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q Testing "$@"
