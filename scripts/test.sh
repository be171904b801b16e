#!/usr/bin/env bash
# Install sdfunc with its test dependencies into ./.venv and run the whole suite. Extra args go to pytest
# (e.g. `-m "not slow"` to skip the 2 GB real-architecture checkpoint test).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="[test]" . scripts/venv.sh
.venv/bin/python -m pip check
exec .venv/bin/python -m pytest "$@"
