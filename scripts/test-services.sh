#!/usr/bin/env bash
# Run or sourced by test.sh before pytest: make sure the system packages the tests need are installed:
#   - a MariaDB server for the records tests and benchmarks (bench/harness/mariadb.py starts throwaway servers from it;
#     nothing here starts one): Debian's mariadb-server;
#   - a Chromium for the browser tests (tests/e2e/test_web_browser.py drives it headless with Playwright):
#     Debian's chromium, at /usr/bin/chromium.
# Installs whatever is missing with one apt-get install when we are root (apt-get update only when that install
# fails). When it cannot, it says which tests will be skipped and succeeds, unless SDFUNC_REQUIRE_MYSQL=1 or
# SDFUNC_REQUIRE_BROWSER=1, which make a missing server or browser an error.
# Quick and silent when everything is already there.
( # a subshell, so that nothing here (options, names) leaks into a shell that sources this file
  set -euo pipefail
  have_mysql() { command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ]; }
  have_browser() { [ -x /usr/bin/chromium ]; }
  missing=()
  about=()
  have_mysql || { missing+=(mariadb-server); about+=("mariadb-server: about 20 s"); }
  have_browser || { missing+=(chromium); about+=("chromium: about 35 s"); }
  [ ${#missing[@]} = 0 ] && exit 0
  why="installing needs root and apt-get"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    printf -v times '%s, ' "${about[@]}"
    echo "test-services: installing ${missing[*]} with apt-get (${times%, })..." >&2
    install=(apt-get install -y -q --no-install-recommends "${missing[@]}")
    export DEBIAN_FRONTEND=noninteractive
    if "${install[@]}" >&2 || { apt-get update -q >&2 && "${install[@]}" >&2; }; then
      why=""
    else
      why="apt-get install ${missing[*]} failed"
    fi
  fi
  status=0
  if ! have_mysql; then
    if [ "${SDFUNC_REQUIRE_MYSQL:-0}" = 1 ]; then
      echo "test-services: ERROR: SDFUNC_REQUIRE_MYSQL=1 but mariadbd is not installed (${why:-not found after install})" >&2
      status=1
    else
      echo "test-services: mariadbd not installed (${why:-not found after install}): the MariaDB tests will be skipped" \
           "(SDFUNC_REQUIRE_MYSQL=1 makes them fail instead)" >&2
    fi
  fi
  if ! have_browser; then
    if [ "${SDFUNC_REQUIRE_BROWSER:-0}" = 1 ]; then
      echo "test-services: ERROR: SDFUNC_REQUIRE_BROWSER=1 but /usr/bin/chromium is not installed (${why:-not found after install})" >&2
      status=1
    else
      echo "test-services: /usr/bin/chromium not installed (${why:-not found after install}): the browser tests will be skipped" \
           "(SDFUNC_REQUIRE_BROWSER=1 makes them fail instead)" >&2
    fi
  fi
  exit $status
)
# Serverless Devs' own s.yaml parser for tests/unit/test_deploy.py: npm packages pinned by
# deploy/serverless-devs/package-lock.json, installed there with `npm ci` (no root needed; about 10 s).
# Without Node.js and npm that test is skipped, unless SDFUNC_REQUIRE_NODE=1, which makes it an error.
(
  set -euo pipefail
  dir=deploy/serverless-devs
  [ -d "$dir/node_modules/@serverless-devs/parse-spec" ] && exit 0
  why="node and npm are not installed"
  if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    echo "test-services: installing Serverless Devs' s.yaml parser with npm ci in $dir..." >&2
    if npm ci --prefix "$dir" --silent --no-audit --no-fund >&2; then
      exit 0
    fi
    why="npm ci in $dir failed"
  fi
  if [ "${SDFUNC_REQUIRE_NODE:-0}" = 1 ]; then
    echo "test-services: ERROR: SDFUNC_REQUIRE_NODE=1 but $why" >&2
    exit 1
  fi
  echo "test-services: $why: the Serverless Devs parser test will be skipped (SDFUNC_REQUIRE_NODE=1 makes it fail)" >&2
)
