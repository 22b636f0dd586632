"""Layer 3, training: the models (signal ensemble, position, SL/TP, risk), their persistence, the Optuna studies and
SHAP. Stands on :mod:`backtest` (tuning objectives and labels are backtests) and below it :mod:`market` and
:mod:`core`."""
