#!/usr/bin/env python
"""Retrain the calibrated signal ensemble (RF + XGBoost + LightGBM) and deploy it atomically.

Fit on the training window with early stopping on the last walk-forward fold, calibrate on the later, purged
calibration slice; the position, SL/TP and risk models are kept. The steps, options and output are described in
``ops/retrain.py`` (the four retrain scripts share it, command line in ``cli/retrain.py``):

    python scripts/retrain_signal.py --data ../shared/data/BTCUSDT_15m_2023_2024.csv
    python scripts/retrain_signal.py --demo --root /tmp/run1 --params results/best_params_signal.json
"""

from cli.retrain import signal_entry

if __name__ == "__main__":
    signal_entry()
