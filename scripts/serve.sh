#!/usr/bin/env bash
# Set up and run the server on its embedded default: a PostgreSQL and a Qdrant engine of its
# own under the data directory, the model built offline. No external service, no download.
# Extra arguments go to `mcp-rag serve` (default: --transport http on 127.0.0.1:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [[ $# -eq 0 ]]; then set -- --transport http; fi
exec .venv/bin/mcp-rag serve "$@"
