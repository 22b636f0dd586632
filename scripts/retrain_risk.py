#!/usr/bin/env python
"""Retrain the risk model (risk multiplier from the account state) and deploy it atomically.

Needs the signal, position and SL/TP models in ``models/`` (one line on stderr and exit code 2
otherwise). The steps, options and output are described in ``ops/retrain.py`` (the four
retrain scripts share it, command line in ``cli/retrain.py``):

    python scripts/retrain_risk.py --data ../shared/data/BTCUSDT_15m_2023_2024.csv
    python scripts/retrain_risk.py --demo --root /tmp/run1 --stage-only
"""

from cli.retrain import risk_entry

if __name__ == "__main__":
    risk_entry()
