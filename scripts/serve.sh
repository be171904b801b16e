#!/usr/bin/env bash
# Install sdfunc into ./.venv (CPU torch, pinned) and start the function on the embedded defaults:
# port 9000, data in ./data, the tiny demo checkpoints written on first start. Extra args go to `sdfunc serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="" . scripts/venv.sh
exec .venv/bin/sdfunc serve "$@"
