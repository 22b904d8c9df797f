#!/usr/bin/env bash
# Create bench/.venv-peers with the peer registration tools (idempotent; the runner calls it).
# torch goes in first, pinned to the project's version, so pip takes the local CPU wheel
# (PIP_FIND_LINKS / pip.conf find-links) and convexadam's dependency on torch is already met.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${PEERS_VENV:-$here/.venv-peers}"
python="${PEERS_PYTHON:-python3}"
torch_spec="${PEERS_TORCH:-torch==2.13.0}"
stamp="$venv/.installed"
if [[ -f "$stamp" && "$stamp" -nt "$here/requirements-peers.txt" && "$stamp" -nt "$0" ]]; then
    exit 0
fi
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$torch_spec"
# antspyx is optional: install the others even when it has no wheel for this platform.
grep -v '^#' "$here/requirements-peers.txt" | grep -v '^antspyx' | xargs "$venv/bin/python" -m pip install --quiet "$torch_spec"
"$venv/bin/python" -m pip install --quiet antspyx "$torch_spec" || echo "antspyx could not be installed" >&2
"$venv/bin/python" -m pip freeze > "$venv/freeze.txt"
touch "$stamp"
