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
# The OpenID provider the OAuth tests start (npm oidc-provider, pinned by tests/oidc/package-lock.json).
lock=tests/oidc/package-lock.json installed=tests/oidc/node_modules/.package-lock.json
if [[ ! -f $installed || $lock -nt $installed ]]; then
    command -v npm >/dev/null || { echo "npm (Node.js >= 20) is needed for the OAuth tests" >&2; exit 1; }
    (cd tests/oidc && npm ci --no-audit --no-fund --silent)
fi
.venv/bin/ruff check mcp_rag tests bench
.venv/bin/ruff format --check mcp_rag tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
