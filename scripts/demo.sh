#!/usr/bin/env bash
# The README's main command: install into .venv, then run the whole weekly job on the embedded DEMO data.
# No MT5, no tokens: seeded demo candles, local model registry, reports to <demo root>/results/<run id>/.
# The demo has its own root, .demo/ (git-ignored), with its own copy of config.json: a demo commit changes
# .demo/config.json and .demo/models/, never the repository's config.json. Start over with `rm -rf .demo`.
# Extra arguments go to weekly_optimize.py (e.g. --quick).
# DEMO_ROOT=DIR picks another root; DEMO_PYTHON=PATH uses that interpreter and skips the install (the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${DEMO_ROOT:-.demo}"
PY="${DEMO_PYTHON:-.venv/bin/python}"
if [ -z "${DEMO_PYTHON:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -r requirements.txt
fi
mkdir -p "$ROOT"
[ -f "$ROOT/config.json" ] || cp config.json "$ROOT/config.json"
echo "demo root: $ROOT (its own config.json, data/, models/, results/; the repository's config.json is not touched)"
exec "$PY" scripts/weekly_optimize.py --root "$ROOT" --demo "$@"
