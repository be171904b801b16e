#!/usr/bin/env bash
# Install sdfunc with its test dependencies into ./.venv and run the whole suite. Extra args go to pytest
# (e.g. `-m "not slow"` to skip the 2 GB real-architecture checkpoint test).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import handler, pipelines, diffusers, webuiapi, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.sdfunc-test-installed ]; then
  echo "installing sdfunc[test] into .venv (first time: a few minutes)..." >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  touch .venv/.sdfunc-test-installed
fi
.venv/bin/python -m pip check
exec .venv/bin/python -m pytest "$@"
