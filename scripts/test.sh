#!/usr/bin/env bash
# Install sdfunc with its test dependencies (and mariadb-server for the records tests, when run as root) and run
# the whole suite. Extra args go to pytest: `-m "not e2e"` is the fast lane (no gunicorn, MariaDB, browser or fuzz
# run; tests/README.md), `-m "not slow"` skips the 2 GB real-architecture checkpoint test.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="[test]" . scripts/venv.sh
bash scripts/test-services.sh  # MariaDB for the records tests (apt-get as root; SDFUNC_REQUIRE_MYSQL=1: must be there)
.venv/bin/python -m pip check
.venv/bin/ruff check .        # lint ([tool.ruff] in pyproject.toml)
.venv/bin/lint-imports        # the one-way arrows between rooms ([tool.importlinter] in pyproject.toml)
# Both cores, one test file per worker (files share their module fixtures; tests/conftest.py gives each worker
# one torch thread and its own temporary folder). `-n 0` runs in one process, e.g. for a debugger.
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
