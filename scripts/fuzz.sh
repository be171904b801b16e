#!/usr/bin/env bash
# The long fuzz run: schemathesis against the real server (gunicorn on 127.0.0.1, the tiny demo checkpoints),
# with many more examples than the bounded run of the test suite (tests/e2e/test_fuzz.py, which documents what is
# fuzzed and how failures are judged). For each auth mode: build a data folder, start `sdfunc serve` with the
# small limits the server writes into its document, fuzz every operation of the document as served
# (/openapi/openapi.json) with every check, GET /pre-stop last (it drains the instance for the admin), stop the
# server, and judge the NDJSON events (`python -m tests.e2e.test_fuzz verdict`): every failed check counts,
# except schema-valid requests refused for a rule the operation lists in `x-refusals` (counted and printed).
# Needs schemathesis in ./.venv (pip install schemathesis==4.32.5).
#
#   scripts/fuzz.sh [none|basic|all] [extra `schemathesis run` options, e.g. --max-time 1800 --phases fuzzing]
#
# Environment: FUZZ_EXAMPLES (examples per operation, default 200), FUZZ_SEED (default: a new one, printed),
# FUZZ_OUT (default test-artifacts/fuzz/<UTC time>). Exit status 1 when any run found a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PY=.venv/bin/python
MODE=${1:-all}
[ $# -gt 0 ] && shift
case "$MODE" in
  none|basic) MODES=("$MODE") ;;
  all) MODES=(none basic) ;;
  *) echo "usage: $0 [none|basic|all] [schemathesis run options]" >&2; exit 2 ;;
esac
"$PY" -c 'import schemathesis' 2>/dev/null || { echo "schemathesis is not installed in .venv" >&2; exit 2; }
EXAMPLES=${FUZZ_EXAMPLES:-200}
SEED=${FUZZ_SEED:-$("$PY" -c 'import random; print(random.getrandbits(32))')}
OUT=$(realpath -m "${FUZZ_OUT:-test-artifacts/fuzz/$(date -u +%Y%m%dT%H%M%SZ)}")
mkdir -p "$OUT"

SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true  # the gunicorn master (`sdfunc serve` execs it); it stops its worker
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
trap stop_server EXIT

status=0
for auth in "${MODES[@]}"; do
  dir="$OUT/$auth"
  mkdir -p "$dir"
  port=$("$PY" -c 'from tests.support.serving import free_port; print(free_port())')
  url="http://127.0.0.1:$port"
  echo "== auth $auth: server on $url, data and reports in $dir"
  (
    for var in $(compgen -e | grep '^SDFUNC_' || true); do unset "$var"; done
    eval "$("$PY" -m tests.e2e.test_fuzz env "$auth")"
    export SDFUNC_LOG_JSON=true
    exec "$PY" -m handler.cli serve --host 127.0.0.1 --port "$port" --data "$dir/data"
  ) >"$dir/server.log" 2>&1 &
  SERVER_PID=$!
  "$PY" - "$url" "$dir/server.log" <<'EOF'
import sys, time
import requests
url, log = sys.argv[1:]
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        if requests.get(url + "/health", timeout=2).json().get("status") == "READY":
            sys.exit(0)
    except requests.RequestException:
        pass
    time.sleep(0.5)
sys.exit(f"the server did not become READY; see {log}")
EOF
  "$PY" -c 'import sys, requests; open(sys.argv[2], "w").write(requests.get(sys.argv[1], timeout=60).text)' \
    "$url/openapi/openapi.json" "$dir/openapi.json"  # what was fuzzed, for the verdict and the record
  auth_args=()
  [ "$auth" = basic ] && auth_args=(--auth "$("$PY" -m tests.e2e.test_fuzz credentials)")
  for part in routes pre-stop; do
    select=(--exclude-path /pre-stop)
    [ "$part" = pre-stop ] && select=(--include-path /pre-stop --phases examples,coverage,fuzzing)  # no links there
    # from $dir: schemathesis keeps its crash cache there (.schemathesis/), so `st replay` works from that folder
    (cd "$dir" && "$ROOT/$PY" -m schemathesis.cli --config-file "$ROOT/tests/schemathesis.toml" --no-color \
      run "$url/openapi/openapi.json" --url "$url" "${auth_args[@]}" "${select[@]}" --max-examples "$EXAMPLES" \
      --seed "$SEED" --continue-on-failure --report junit,json,ndjson,har --report-dir "$dir/$part" "$@" \
      >"$dir/$part.txt" 2>&1) || true  # judged below: a listed refusal fails schemathesis' own exit status
    tail -n 30 "$dir/$part.txt"
  done
  echo "== auth $auth: verdict"
  "$PY" -m tests.e2e.test_fuzz verdict "$dir/openapi.json" "$dir/routes" "$dir/pre-stop" | tee "$dir/verdict.txt" \
    || status=1
  stop_server
  if grep -q '"level": "\(ERROR\|CRITICAL\)"' "$dir/server.log"; then
    echo "the server logged errors (background work): grep '\"level\": \"ERROR\"' $dir/server.log"
    status=1
  fi
done

echo
echo "seed $SEED, $EXAMPLES examples per operation; verdicts, reports (JUnit, JSON, NDJSON, HAR with every request)"
echo "and server logs:"
for auth in "${MODES[@]}"; do echo "  $OUT/$auth/verdict.txt  $OUT/$auth/{routes,pre-stop}/  $OUT/$auth/server.log"; done
exit $status
