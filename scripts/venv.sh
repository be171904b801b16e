# Sourced by serve.sh and test.sh: make ./.venv and install the project with the extras in $EXTRAS
# (empty for serving, "[test]" for tests) when it is missing or pyproject.toml changed since.
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.sdfunc-installed${EXTRAS:+-test}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing sdfunc${EXTRAS} into .venv (first time: a few minutes)..." >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".${EXTRAS}"
  touch "$stamp"
fi
