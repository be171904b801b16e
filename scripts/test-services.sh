#!/usr/bin/env bash
# Run or sourced by test.sh before pytest: make sure a MariaDB server is installed for the tests and
# benchmarks (bench/mariadb.py starts throwaway servers from it; nothing here starts one). Installs Debian's
# mariadb-server with apt-get when mariadbd is missing and we are root. When it cannot, it says the MariaDB
# tests will be skipped and succeeds, unless SDFUNC_REQUIRE_MYSQL=1, which makes a missing server an error.
# Quick and silent when mariadbd is already there.
( # a subshell, so that nothing here (options, names) leaks into a shell that sources this file
  set -euo pipefail
  have() { command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ]; }
  have && exit 0
  why="installing needs root and apt-get"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test-services: mariadbd missing, installing mariadb-server with apt-get (about 20 s)..." >&2
    install=(apt-get install -y -q --no-install-recommends mariadb-server)
    export DEBIAN_FRONTEND=noninteractive
    if "${install[@]}" >&2 || { apt-get update -q >&2 && "${install[@]}" >&2; }; then
      have && exit 0
    fi
    why="apt-get install mariadb-server failed"
  fi
  if [ "${SDFUNC_REQUIRE_MYSQL:-0}" = 1 ]; then
    echo "test-services: ERROR: SDFUNC_REQUIRE_MYSQL=1 but mariadbd is not installed ($why)" >&2
    exit 1
  fi
  echo "test-services: mariadbd not installed ($why): the MariaDB tests will be skipped" \
       "(SDFUNC_REQUIRE_MYSQL=1 makes them fail instead)" >&2
)
