#!/usr/bin/env python
"""Retrain the position (exit) model and deploy it atomically.

Needs the signal models in ``models/`` (one line on stderr and exit code 2 otherwise). The steps, options and
output are described in ``ops/retrain.py`` (the four retrain scripts share it):

    python scripts/retrain_position.py --data ../shared/data/BTCUSDT_15m_2023_2024.csv
    python scripts/retrain_position.py --demo --root /tmp/run1 --params results/best_params_position.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.errors import cli_main  # noqa: E402
from ops.retrain import main_for  # noqa: E402

if __name__ == "__main__":
    cli_main(main_for("position"))
