#!/usr/bin/env bash
# The README's test command: creates .venv if needed, installs the pinned requirements and the package (editable),
# lints (ruff, import-linter layers), runs the whole suite.
# pytest exit code 5 ("no tests collected") is treated as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
# PostgreSQL (initdb/pg_ctl) for the several-workers Optuna test. Without it that test is SKIPPED, with its reason
# in the summary (pytest -ra); with CI=true or REQUIRE_POSTGRES=1 (what .ci/run sets) it FAILS instead, since a CI
# machine can always install it. Fresh machines have no package lists: update them before installing.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null 2>&1 && $SUDO apt-get update -q >/dev/null \
      && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q postgresql >/dev/null; then
    echo "installed PostgreSQL for the several-workers Optuna test"
  else
    echo "warning: PostgreSQL could not be installed (apt-get update/install failed or no apt-get):" \
         "the several-workers PostgreSQL test will be SKIPPED (or FAIL with CI=true / REQUIRE_POSTGRES=1)" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q -e .   # the package and its commands (weekly-optimize, backtest, ...): no sys.path edits
.venv/bin/python -m ruff check .
.venv/bin/lint-imports                    # the layer contract in pyproject.toml: an upward import fails CI
set +e
.venv/bin/python -m pytest -q -n 2 --durations=15 "$@"   # the 15 slowest tests in the log: where CI time goes
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
