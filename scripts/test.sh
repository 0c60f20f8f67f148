#!/usr/bin/env bash
# Set up and run every check: lint, types, and the test suite (which starts its own
# PostgreSQL servers on 127.0.0.1 from the Debian server binaries, installing them if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "PostgreSQL server binaries are missing: install the 'postgresql' package" >&2
        exit 1
    fi
fi

scripts/setup.sh --dev
.venv/bin/ruff check mcp_rag tests bench
.venv/bin/ruff format --check mcp_rag
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
