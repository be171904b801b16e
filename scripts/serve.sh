#!/usr/bin/env bash
# Install sdfunc into ./.venv (CPU torch, pinned) and start the function on the embedded defaults:
# port 9000, data in ./data, the tiny demo checkpoints written on first start. Extra args go to `sdfunc serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import handler, pipelines, diffusers, flask_openapi3" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.sdfunc-installed ]; then
  echo "installing sdfunc into .venv (first time: a few minutes)..." >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e .
  touch .venv/.sdfunc-installed
fi
exec .venv/bin/sdfunc serve "$@"
