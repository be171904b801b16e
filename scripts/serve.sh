#!/usr/bin/env bash
# Install sdfunc into ./.venv (CPU torch, pinned) and start the function on the embedded defaults:
# port 9000, data in ./data, the tiny demo checkpoints written on first start. Extra args go to `sdfunc serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="" . scripts/venv.sh
# The server's cold start counts from here, not from this script's start (exec keeps the process, and the
# install above would count as the function's start).
SDFUNC_PROCESS_STARTED_AT="$(python3 -c 'import time; print(time.time())')" exec .venv/bin/sdfunc serve "$@"
