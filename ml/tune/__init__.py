"""The two Optuna studies: the signal ensemble's hyperparameters (:mod:`ml.tune.hyperparams`, its folds' rows, models
and backtest in :mod:`ml.tune.folds`) and the position model's (:mod:`ml.tune.position`), on shared plumbing
(:mod:`ml.tune.common`).

Both tune only on purged walk-forward folds inside the training window; the final OOS window is never read
(:func:`ml.tune.common.guard_indices`).
"""
