#!/usr/bin/env bash
# The README's test command: creates .venv if needed, installs the pinned requirements and the package (editable),
# lints (ruff, import-linter layers), runs the whole suite.
# pytest exit code 5 ("no tests collected") is treated as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  (apt-get install -y postgresql >/dev/null 2>&1 || sudo apt-get install -y postgresql >/dev/null 2>&1) || true
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q -e .   # the package and its commands (weekly-optimize, backtest, ...): no sys.path edits
.venv/bin/python -m ruff check .
.venv/bin/lint-imports                    # the layer contract in pyproject.toml: an upward import fails CI
set +e
.venv/bin/python -m pytest -q -n 2 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
