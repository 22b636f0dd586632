#!/usr/bin/env bash
# The README's main command: install into .venv, then run the whole weekly job on the embedded DEMO data.
# No MT5, no tokens: seeded demo candles, local model registry (registry/), reports to results/<run id>/.
# Extra arguments go to weekly-optimize (scripts/weekly_optimize.py; e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q -e .
exec .venv/bin/weekly-optimize --demo "$@"
