#!/usr/bin/env bash
# Set up .venv, then run the main job on the demo case (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ikr demo "$@"
