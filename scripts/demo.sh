#!/usr/bin/env bash
# The README's main command: install into .venv, then run the whole weekly job on the embedded DEMO data.
# No MT5, no tokens: seeded demo candles, local model registry, reports to <demo root>/results/<run id>/.
# The demo has its own root, .demo/ (git-ignored), with its own copy of config.json: a demo commit changes
# .demo/config.json and .demo/models/, never the repository's config.json. Start over with `rm -rf .demo`.
# Extra arguments go to weekly-optimize (scripts/weekly_optimize.py; e.g. --quick).
# DEMO_ROOT=DIR picks another root; DEMO_PYTHON=PATH uses that interpreter and skips the install (the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${DEMO_ROOT:-.demo}"
if [ -z "${DEMO_PYTHON:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q -e .
fi
mkdir -p "$ROOT"
[ -f "$ROOT/config.json" ] || cp config.json "$ROOT/config.json"
echo "demo root: $ROOT (its own config.json, data/, models/, results/; the repository's config.json is not touched)"
if [ -n "${DEMO_PYTHON:-}" ]; then
  exec "$DEMO_PYTHON" scripts/weekly_optimize.py --root "$ROOT" --demo "$@"
fi
exec .venv/bin/weekly-optimize --root "$ROOT" --demo "$@"
