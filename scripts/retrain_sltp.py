#!/usr/bin/env python
"""Retrain the SL/TP models (stop and target distances in ATR units) and deploy them atomically.

Needs the signal models and the position model in ``models/`` (one line on stderr and exit code 2
otherwise). The steps, options and output are described in ``ops/retrain.py`` (the four
retrain scripts share it, command line in ``cli/retrain.py``):

    python scripts/retrain_sltp.py --data ../shared/data/BTCUSDT_15m_2023_2024.csv
    python scripts/retrain_sltp.py --demo --root /tmp/run1 --stage-only
"""

from cli.retrain import sltp_entry

if __name__ == "__main__":
    sltp_entry()
