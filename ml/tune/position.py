#!/usr/bin/env python
"""The position (exit) model study: LightGBM hyperparameters of :mod:`ml.models.position` on purged trade folds.

Objective of one trial (maximised)::

    mean over folds k of   accuracy_k  x  exit_precision_k          (ml.models.position.position_metrics)

both at the trading threshold ``trading.exit_threshold``, on the validation trades of fold ``k``.

* Inputs: the signal's *out-of-fold* probabilities on the training window (:func:`ml.tune.hyperparams.oof_signal_proba`:
  walk-forward, calibrated per fold, never the OOS window). The positions they open are simulated once per study
  with the backtester's rules (:func:`ml.models.position.position_rows`): one row per bar a position is open.
* Folds (:func:`position_folds`): walk-forward over *trades*, not rows: the trades are cut into ``n_folds + 1``
  chronological blocks; fold ``k`` validates on block ``k + 1`` and trains on the earlier trades whose exit (the end
  of everything their rows' targets read) lies at least ``embargo`` bars before the first validation trade's fill.
  All rows of one trade share its outcome, so a trade never straddles train and validation.
* Each fold early-stops on its validation rows (binary log loss; ``num_boost_round`` is a cap) and reports the
  running mean; the median pruner may stop a trial after its first fold.
* An exit model that never exits scores 0 (precision of nothing is 0 here, by :func:`position_metrics`): the study
  cannot win by switching the model off.

    python -m ml.tune.position --data ../shared/data/BTCUSDT_15m_2023_2024.csv --n-trials 50 --n-jobs 2
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.pruners import BasePruner

from core.config import Config
from core.errors import UserError
from market.dataset import Dataset
from ml.tune import common
from ml.tune.common import StudyResult, guard_indices

log = logging.getLogger("ml.tune")

KIND = "position"
SPACE_VERSION = "position-v1"
MIN_TRADES_PER_FOLD = 20
BOOST_CAP = 300

IndexHook = Callable[[str, np.ndarray], None]


# --------------------------------------------------------------------------------------------------- search space
def suggest_position_params(trial: optuna.Trial) -> dict[str, Any]:
    """LightGBM parameters for :func:`ml.models.position.fit_position_model`.

    Why these ranges: the rows of one trade are strongly correlated, so the effective sample size is the number of
    trades (hundreds to a few thousand), not of rows. Hence small trees (4-63 leaves) with large leaf floors (20-1000
    rows, log), feature and row bagging, L1/L2 terms, and a learning rate of 0.02-0.3 with early stopping (the round
    count is a cap of 300, not a cost). ``max_bin`` stays 63: cheap histograms, and the state features are smooth.
    """
    return {
        "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.3, log=True),
        "num_leaves": trial.suggest_int("num_leaves", 4, 63, log=True),
        "max_depth": -1,
        "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 20, 1000, log=True),
        "feature_fraction": trial.suggest_float("feature_fraction", 0.5, 1.0),
        "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
        "bagging_freq": 1,
        "lambda_l1": trial.suggest_float("lambda_l1", 1e-3, 10.0, log=True),
        "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 10.0, log=True),
        "max_bin": 63,
        "num_boost_round": BOOST_CAP,
        "early_stopping_rounds": 30,
    }


def model_params_from_flat(flat: dict[str, Any]) -> dict[str, Any]:
    """The full parameter set of a trial's flat Optuna parameters (e.g. ``study.best_params``)."""
    return suggest_position_params(optuna.trial.FixedTrial(dict(flat)))


# --------------------------------------------------------------------------------------------------- folds
def position_folds(groups: np.ndarray, fill_bar: np.ndarray, exit_bar: np.ndarray, n_folds: int, embargo: int,
                   min_trades: int = MIN_TRADES_PER_FOLD) -> list[tuple[np.ndarray, np.ndarray]]:
    """Purged walk-forward folds of row indices, cut by trade (see the module docstring).

    ``groups`` is the trade id of each row (ids index ``fill_bar`` / ``exit_bar``, chronological). Folds whose
    training or validation side has fewer than ``min_trades`` trades are dropped.
    """
    groups = np.asarray(groups, dtype=np.int64)
    trades = np.unique(groups)
    folds: list[tuple[np.ndarray, np.ndarray]] = []
    if trades.size == 0:
        return folds
    blocks = np.array_split(trades, n_folds + 1)
    for k in range(1, len(blocks)):
        val_trades = blocks[k]
        if val_trades.size < min_trades:
            continue
        first_fill = int(fill_bar[val_trades[0]])
        prior = np.concatenate(blocks[:k])
        train_trades = prior[exit_bar[prior] + embargo < first_fill]
        if train_trades.size < min_trades:
            continue
        tr = np.flatnonzero(np.isin(groups, train_trades))
        va = np.flatnonzero(np.isin(groups, val_trades))
        folds.append((tr, va))
    return folds


# --------------------------------------------------------------------------------------------------- objective
def make_objective(rows: Any, folds: list[tuple[np.ndarray, np.ndarray]], cfg: Config, oos_start: int,
                   index_hook: IndexHook | None = None) -> Callable[[optuna.Trial], float]:
    """The trial function over prepared position rows (:class:`ml.models.position.PositionRows`) and folds."""
    from ml.models.position import fit_position_model, position_metrics

    X, y = rows.X, rows.y
    bars = np.asarray(rows.bars, dtype=np.int64)
    exit_of_row = np.asarray(rows.trades.exit_bar, dtype=np.int64)[np.asarray(rows.groups, dtype=np.int64)]
    seed = int(cfg.tuning.seed)
    thr = float(cfg.trading.exit_threshold)
    hook = index_hook or (lambda what, idx: None)

    def positions_read(r: np.ndarray) -> np.ndarray:
        """Every bar a row's features and target read: its bar, the next open (exit fill), its trade's exit."""
        return np.concatenate([bars[r], bars[r] + 1, exit_of_row[r]])

    def objective(trial: optuna.Trial) -> float:
        params = suggest_position_params(trial)
        trial.set_user_attr("pid", os.getpid())

        def fold(k: int, tr: np.ndarray, va: np.ndarray) -> tuple[float, dict[str, Any]]:
            t0 = time.perf_counter()
            hook("train_bars", positions_read(tr))
            hook("val_bars", positions_read(va))
            model = fit_position_model(X[tr], y[tr], params, seed, eval_set=(X[va], y[va]))
            m = position_metrics(y[va], model.predict_exit(X[va]), thr)
            return float(m["objective"]), {
                "accuracy": round(m["accuracy"], 5), "exit_precision": round(m["exit_precision"], 5),
                "exit_rate": round(m["exit_rate"], 5), "base_rate": round(m["base_rate"], 5),
                "rounds": model.info.get("rounds"), "n_train": int(tr.size), "n_val": int(va.size),
                "s": round(time.perf_counter() - t0, 3)}

        return common.run_folds(trial, folds, fold, oos_start, to_positions=positions_read)

    return objective


# --------------------------------------------------------------------------------------------------- study
def _pls_hash(pls: np.ndarray, positions: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pls[positions]).tobytes()).hexdigest()[:12]


def run_position_study(ds: Dataset, cfg: Config, results_dir: Path, p_long_short: np.ndarray,
                       n_trials: int | None = None, timeout: float | None = None, storage: str | None = None,
                       study_name: str | None = None, n_jobs: int | None = None, *,
                       positions: np.ndarray | None = None, top_up: bool = False, worker: int = 0,
                       min_trades_per_fold: int = MIN_TRADES_PER_FOLD, pruner: BasePruner | None = None,
                       index_hook: IndexHook | None = None, buffered: bool = False) -> StudyResult:
    """Run (or continue) the position study on the signal probabilities ``p_long_short`` and write its artefacts.

    ``p_long_short`` is ``(n_bars, 2)`` ``[p_long, p_short]`` on the training window, e.g.
    ``oof_signal_proba(ds, cfg, params).p_long_short`` (NaN = no signal). ``positions`` are the bars on which a
    position may be opened (default: where the probabilities are finite); all of them, and every bar the simulated
    trades read, must lie before the OOS window. ``n_trials`` defaults to ``cfg.tuning.position_trials``; the other
    options are those of :func:`ml.tune.hyperparams.run_signal_study`; a fold needs ``min_trades_per_fold`` trades on
    each side (fewer is a :class:`UserError`: the pipeline then keeps the default parameters). The position model
    trains single-threaded (bit-reproducible), so ``n_jobs=2`` parallel trials is how this study uses two cores.
    """
    from ml.models.position import position_rows

    results_dir = Path(results_dir)
    n_trials = int(n_trials if n_trials is not None else cfg.tuning.position_trials)
    timeout = timeout if timeout is not None else cfg.tuning.timeout_s
    n_jobs = int(n_jobs or cfg.tuning.n_jobs)
    oos_start = int(ds.splits.oos_start)
    pls = np.asarray(p_long_short, dtype=np.float64)
    if pls.shape != (ds.splits.n_bars, 2):
        raise ValueError(f"p_long_short must be ({ds.splits.n_bars}, 2), got {pls.shape}")
    if positions is None:
        positions = np.flatnonzero(np.isfinite(pls).all(axis=1))
    positions = guard_indices(positions, oos_start, "position entry bars")
    if positions.size == 0:
        raise UserError("position study: no bar with signal probabilities before the OOS window")

    t0 = time.perf_counter()
    rows = position_rows(ds, pls, cfg, positions)
    if rows.trades.n:
        guard_indices(rows.trades.exit_bar, oos_start, "simulated trade exits")
        guard_indices(rows.bars + 1, oos_start, "position rows")
    folds = position_folds(rows.groups, rows.trades.fill_bar, rows.trades.exit_bar, cfg.splits.n_folds,
                           int(ds.splits.embargo), min_trades=min_trades_per_fold)
    stats = rows.stats()
    log.info("position rows: %d trades, %d rows, exit share %.3f, %d fold(s), built in %.1fs", stats["n_trades"],
             stats["n_rows"], stats["exit_share"], len(folds), time.perf_counter() - t0)
    if not folds:
        raise UserError(f"position study: {stats['n_trades']} simulated trades are too few for {cfg.splits.n_folds} "
                        f"purged folds of >= {min_trades_per_fold} trades (more history, or a lower "
                        "trading.confidence_threshold)")

    version = f"{SPACE_VERSION}:{_pls_hash(pls, positions)}"
    url = common.resolve_storage(storage, results_dir)
    name = study_name or common.default_study_name(KIND, ds, cfg, version)
    study = common.create_or_load_study(name, url, cfg.tuning.seed, pruner=pruner, worker=worker, user_attrs={
        "kind": KIND, "fingerprint": common.fingerprint(ds, cfg, version), "space_version": SPACE_VERSION,
        "objective": "mean_k accuracy x exit_precision @ trading.exit_threshold", "n_folds": len(folds),
        "rows": stats, "oos_start": oos_start})
    objective = make_objective(rows, folds, cfg, oos_start, index_hook)
    durations = common.run_study(study, objective, KIND, n_trials, timeout=timeout, n_jobs=n_jobs, top_up=top_up,
                                 warm_start_trials=cfg.tuning.warm_start_trials, buffered=buffered)
    return common.finish(study, durations, results_dir, KIND, extra={
        "model_params": model_params_from_flat(study.best_params), "seed": cfg.tuning.seed, "n_jobs": n_jobs,
        "rows": stats, "per_trial_seconds_this_run": [round(d, 3) for d in durations]})


if __name__ == "__main__":  # the seed's spelling of the command (cli.tune; upward import listed in pyproject.toml)
    from cli.tune import position_entry

    position_entry()
