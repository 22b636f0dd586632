#!/usr/bin/env python
"""Retrain the position (exit) model and deploy it atomically.

Needs the signal models in ``models/`` (one line on stderr and exit code 2 otherwise). The steps, options and
output are described in ``ops/retrain.py`` (the four
retrain scripts share it, command line in ``cli/retrain.py``):

    python scripts/retrain_position.py --data ../shared/data/BTCUSDT_15m_2023_2024.csv
    python scripts/retrain_position.py --demo --root /tmp/run1 --params results/best_params_position.json
"""

from cli.retrain import position_entry

if __name__ == "__main__":
    position_entry()
