#!/usr/bin/env python
"""The signal ensemble study: RF / XGBoost / LightGBM hyperparameters tuned on purged walk-forward folds.

Objective of one trial (maximised)::

    mean over folds k of   F1_macro(y[val_k], argmax ensemble_proba)  x  (1 - max_drawdown_pct_k / 100)

* fold ``k`` = ``Dataset.splits.folds[k]``: training positions (purged, CUSUM events only when
  ``labels.cusum_atr > 0``) and the next walk-forward block as validation, all inside the training window;
* the fold's ensemble is made the way production makes it (:class:`FoldModelPool`): the three models are fit with
  the trial's parameters on the fold's training positions, the boosters stop early on the purged last 15 % of those
  positions (``n_estimators`` is only a cap) and each model is calibrated on that same later tail. The validation
  block is used for nothing but the score;
* F1 is the macro F1 of the raw ensemble's argmax on every label-valid bar of the fold's validation block (all
  bars, also when training uses CUSUM events only: the live bot decides on every bar, and the objective stays
  comparable between sampling settings, which the performance benchmark's quality check relies on): it measures
  the discrimination the hyperparameters control. Measured: argmax after isotonic calibration on a fold's small
  tail loses ~0.04 F1 on the first fold and only adds noise to the ranking of trials;
* the drawdown comes from the compiled fast backtest (:func:`backtest.engine.run_arrays`) of the *calibrated*
  ensemble's (p_long, p_short) over *every* bar of the validation block's range, with the active trading parameters
  of config.json and the fixed ATR stops (no SL/TP, position or risk model exists at this stage): it trades the way
  production would;
* after each fold the running mean is reported; the median pruner stops hopeless trials from the first fold on.

The final OOS window is never read: every index the objective receives passes :func:`ml.tune.common.guard_indices`
(the ``index_hook`` argument lets the tests record them).

Known weakness of this objective (kept because it is the specified one; the per-fold ``trades`` attribute shows it):
a fold without trades has no drawdown, so its factor is 1; a trial whose models rarely pass the trading threshold
is not penalised for it. Calibration (above) makes the folds trade as production would, which limits this.

Cost: see :func:`run_signal_study` and the README ("What a trial costs").

    python -m ml.tune.hyperparams --data ../shared/data/BTCUSDT_15m_2023_2024.csv --n-trials 100
    python ml/tune/hyperparams.py --storage postgresql+psycopg2://u:pw@db:5432/optuna --study-name w47 --worker 1
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.pruners import BasePruner

from core.config import Config
from core.io import atomic_write
from market.dataset import Dataset
from ml.tune import common
from ml.tune.common import StudyResult, guard_indices
from ml.tune.folds import TAIL_FRACTION, FoldBacktester, FoldModelPool, bar_range, train_rows

log = logging.getLogger("ml.tune")

KIND = "signal"
SPACE_VERSION = "signal-v3"  # bump when the search space or the objective changes: a new study name follows
EARLY_STOPPING_ROUNDS = 20
RF_TREES = 100
BOOSTER_CAP = 400  # n_estimators cap of the boosters; early stopping ends them well before (tens of rounds measured)

IndexHook = Callable[[str, np.ndarray], None]


# --------------------------------------------------------------------------------------------------- search space
def suggest_signal_params(trial: optuna.Trial) -> dict[str, dict[str, Any]]:
    """Sample the three models' constructor parameters (nested as :func:`ml.models.signal.fit_signal_models` takes).

    Why these ranges (cheap and sensible on ~40 noisy features and 10-50k samples; CPU seconds measured on the real
    BTC folds, README "What a trial costs"):

    * RF: ``n_estimators`` is fixed at :data:`RF_TREES`, not tuned. More trees never hurt a forest, they only cost, so
      a tuner always drifts towards the most expensive value for a last +0.001 of F1 (measured: 200 trees at 40 %
      rows/features = F1 0.3926 for 43 CPU-s over the folds, 125 trees at 25 % = 0.3921 for 11 s). What is tuned
      is what changes the bias/variance trade-off: depth 4-12, leaves of 20-400 samples (log), and each tree's
      bootstrap share (10-30 %) and feature share (10-35 %), which also keep a trial cheap.
    * Boosters: learning rate 0.02-0.3 (log) with early stopping after :data:`EARLY_STOPPING_ROUNDS` rounds without
      improvement, so ``n_estimators`` is only a cap and the rate decides the cost (measured: a patience of 15-30
      gives the same validation log loss to 5 decimals; 20 saves ~15 % of the boosters' time over 30); small trees
      (XGB depth 2-7, LGB 7-63 leaves) because deep trees only memorise noise here; row and column subsampling and
      L1/L2 terms as the usual regularisers; ``max_bin`` fixed at ~128 (histograms).
    """
    rf = {
        "n_estimators": RF_TREES,
        "max_depth": trial.suggest_int("rf_max_depth", 4, 12),
        "min_samples_leaf": trial.suggest_int("rf_min_samples_leaf", 20, 400, log=True),
        "max_features": trial.suggest_float("rf_max_features", 0.1, 0.35),
        "max_samples": trial.suggest_float("rf_max_samples", 0.1, 0.3),
        "bootstrap": True,
    }
    xgb = {
        "n_estimators": BOOSTER_CAP,
        "learning_rate": trial.suggest_float("xgb_learning_rate", 0.02, 0.3, log=True),
        "max_depth": trial.suggest_int("xgb_max_depth", 2, 7),
        "min_child_weight": trial.suggest_float("xgb_min_child_weight", 1.0, 100.0, log=True),
        "subsample": trial.suggest_float("xgb_subsample", 0.5, 1.0),
        "colsample_bytree": trial.suggest_float("xgb_colsample_bytree", 0.4, 1.0),
        "reg_lambda": trial.suggest_float("xgb_reg_lambda", 1e-3, 10.0, log=True),
        "reg_alpha": trial.suggest_float("xgb_reg_alpha", 1e-3, 10.0, log=True),
        "max_bin": 128,
        "early_stopping_rounds": EARLY_STOPPING_ROUNDS,
    }
    lgb = {
        "n_estimators": BOOSTER_CAP,
        "learning_rate": trial.suggest_float("lgb_learning_rate", 0.02, 0.3, log=True),
        "num_leaves": trial.suggest_int("lgb_num_leaves", 7, 63, log=True),
        "min_child_samples": trial.suggest_int("lgb_min_child_samples", 10, 400, log=True),
        "subsample": trial.suggest_float("lgb_subsample", 0.5, 1.0),
        "subsample_freq": 1,
        "colsample_bytree": trial.suggest_float("lgb_colsample_bytree", 0.4, 1.0),
        "reg_lambda": trial.suggest_float("lgb_reg_lambda", 1e-3, 10.0, log=True),
        "reg_alpha": trial.suggest_float("lgb_reg_alpha", 1e-3, 10.0, log=True),
        "max_bin": 127,
        "early_stopping_rounds": EARLY_STOPPING_ROUNDS,
    }
    return {"rf": rf, "xgb": xgb, "lgb": lgb}


def model_params_from_flat(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Nested model parameters from a trial's flat Optuna parameters (e.g. ``study.best_params``)."""
    return suggest_signal_params(optuna.trial.FixedTrial(dict(flat)))


# --------------------------------------------------------------------------------------------------- objective
def make_objective(ds: Dataset, cfg: Config, n_threads: int = 1, index_hook: IndexHook | None = None,
                   backtester: FoldBacktester | None = None, calibrate: bool = True,
                   pool: FoldModelPool | None = None) -> Callable[[optuna.Trial], float]:
    """The trial function (see the module docstring). ``index_hook(what, positions)`` sees every index array the
    objective reads, after the guard (tests record them). ``pool`` fits the folds' models (default: a new
    :class:`FoldModelPool`; :func:`run_signal_study` passes the one it closes at the end)."""
    from ml.models.signal import combine_proba, p_long_short, signal_metrics

    y = ds.y
    valid = ds.labels["valid"].to_numpy(bool)
    seed = int(cfg.tuning.seed)
    oos_start = int(ds.splits.oos_start)
    bt = backtester or FoldBacktester(ds, cfg)
    hook = index_hook or (lambda what, idx: None)
    fits = pool or FoldModelPool(ds)
    lock = threading.Lock()

    def objective(trial: optuna.Trial) -> float:
        params = suggest_signal_params(trial)
        trial.set_user_attr("pid", os.getpid())
        seen: list[FoldProba] = []

        def fold(k: int, tr: np.ndarray, va: np.ndarray) -> tuple[float, dict[str, Any]]:
            t0, c0 = time.perf_counter(), time.thread_time()
            tr = guard_indices(train_rows(ds, tr), oos_start, f"fold {k} train")
            s, e = bar_range(va)
            bars = guard_indices(np.arange(s, e), oos_start, f"fold {k} backtest bars")
            hook("train", tr)
            hook("val", va)
            hook("bars", bars)
            raw, cal, info = fits.fit_predict(tr, params, (s, e), seed, n_jobs=n_threads, calibrate=calibrate)
            scored = bars[valid[s:e]]  # every label-valid bar of the block, whatever the training sampling
            f1 = signal_metrics(y[scored], combine_proba({n: p[scored - s] for n, p in raw.items()}))["f1_macro"]
            proba = combine_proba(cal)
            seen.append(FoldProba(s, e, proba, dict(info["rounds"])))
            res = bt.run(s, e, p_long_short(proba))
            value = f1 * max(0.0, 1.0 - res["max_drawdown_pct"] / 100.0)
            return value, {"f1": round(f1, 5), "max_dd_pct": round(res["max_drawdown_pct"], 3),
                           "trades": res["trades"], "return_pct": round(res["return_pct"], 3), **info,
                           "n_val": int(va.size), "s": round(time.perf_counter() - t0, 2),
                           "cpu_s": round(time.thread_time() - c0, 2)}  # this thread's CPU: load-independent cost

        value = common.run_folds(trial, ds.splits.folds, fold, oos_start)  # raises TrialPruned if pruned
        with lock:
            if len(seen) == len(ds.splits.folds) and value > kept.value:  # the first best, as Optuna's best_trial
                kept.value, kept.number, kept.folds, kept.params = value, trial.number, list(seen), params
        return value

    kept = KeptFolds(n_jobs=n_threads, calibrate=calibrate)
    objective.kept = kept  # type: ignore[attr-defined]
    return objective


@dataclass
class FoldProba:
    """One fold's calibrated ensemble probabilities on its bar range ``[s, e)`` and its boosters' rounds."""

    s: int
    e: int
    proba: np.ndarray
    rounds: dict[str, int | None]


@dataclass
class KeptFolds:
    """The fold probabilities of the best complete trial an objective has run (``objective.kept``)."""

    n_jobs: int  # the library threads and the calibration the objective fit its folds with
    calibrate: bool
    value: float = -np.inf
    number: int | None = None
    folds: list[FoldProba] = field(default_factory=list)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- study
def run_signal_study(ds: Dataset, cfg: Config, results_dir: Path, n_trials: int | None = None,
                     timeout: float | None = None, storage: str | None = None, study_name: str | None = None,
                     n_jobs: int | None = None, *, threads: int = common.DEFAULT_THREADS, top_up: bool = False,
                     worker: int = 0, pruner: BasePruner | None = None, index_hook: IndexHook | None = None,
                     buffered: bool = False) -> StudyResult:
    """Run (or continue) the signal study and write its artefacts under ``results_dir``.

    ``n_trials`` defaults to ``cfg.tuning.signal_trials``, ``timeout`` to ``cfg.tuning.timeout_s``, ``n_jobs``
    (parallel trials in this process, as threads) to ``cfg.tuning.n_jobs``; each trial's libraries get ``threads``
    threads (default 1, see :data:`ml.tune.common.DEFAULT_THREADS`: use ``n_jobs=2`` for two cores). ``storage``
    defaults to ``sqlite:///<results_dir>/optuna.db`` and ``study_name`` to one derived from the data
    (:func:`ml.tune.common.default_study_name`). Resuming: see :mod:`ml.tune.common` (``top_up=False`` adds
    ``n_trials`` trials; ``top_up=True`` runs only the missing ones). ``pruner`` replaces the default median pruner
    (``optuna.pruners.NopPruner()`` is the slow reference a benchmark compares against). ``buffered``: see
    :func:`ml.tune.common.run_study` (the weekly run's setting).
    """
    results_dir = Path(results_dir)
    n_trials = int(n_trials if n_trials is not None else cfg.tuning.signal_trials)
    timeout = timeout if timeout is not None else cfg.tuning.timeout_s
    n_jobs = int(n_jobs or cfg.tuning.n_jobs)
    url = common.resolve_storage(storage, results_dir)
    name = study_name or common.default_study_name(KIND, ds, cfg, SPACE_VERSION)
    fp = common.fingerprint(ds, cfg, SPACE_VERSION)
    with FoldModelPool(ds) as pool:
        study = common.create_or_load_study(name, url, cfg.tuning.seed, pruner=pruner, worker=worker, user_attrs={
            "kind": KIND, "fingerprint": fp, "space_version": SPACE_VERSION,
            "objective": "mean_k F1_macro x (1 - maxDD)", "n_folds": len(ds.splits.folds),
            "oos_start": int(ds.splits.oos_start)})
        objective = make_objective(ds, cfg, n_threads=threads, index_hook=index_hook, pool=pool)
        durations = common.run_study(study, objective, KIND, n_trials, timeout=timeout, n_jobs=n_jobs,
                                     top_up=top_up, warm_start_trials=cfg.tuning.warm_start_trials,
                                     buffered=buffered)
    result = common.finish(study, durations, results_dir, KIND, extra={
        "model_params": model_params_from_flat(study.best_params), "seed": cfg.tuning.seed,
        "threads_per_trial": threads, "n_jobs": n_jobs,
        "per_trial_seconds_this_run": [round(d, 3) for d in durations]})
    kept: KeptFolds = objective.kept  # type: ignore[attr-defined]
    cache = results_dir / OOF_CACHE
    if kept.number is not None and kept.number == study.best_trial.number:
        save_oof_cache(cache, ds, kept, int(cfg.tuning.seed))
    else:  # the best trial ran in an earlier process (a resumed study): oof_signal_proba fits its folds again
        cache.unlink(missing_ok=True)
    return result


# --------------------------------------------------------------------------------------------------- OOF
@dataclass
class OOFSignal:
    """Walk-forward out-of-fold signal probabilities.

    ``proba`` is ``(n_bars, 3)`` and ``p_long_short`` ``(n_bars, 2)``, NaN outside ``positions`` (the bars of the
    folds' validation ranges, all before the OOS window); ``fold`` gives each covered bar's fold number (-1 elsewhere).
    """

    positions: np.ndarray
    proba: np.ndarray
    p_long_short: np.ndarray
    fold: np.ndarray
    rounds: list[dict[str, int | None]]

    @classmethod
    def from_folds(cls, n_bars: int, folds: Sequence[FoldProba]) -> OOFSignal:
        from ml.models.signal import p_long_short as to_ls

        proba = np.full((n_bars, 3), np.nan)
        fold_of = np.full(n_bars, -1, dtype=np.int64)
        for k, f in enumerate(folds):
            proba[f.s:f.e] = f.proba
            fold_of[f.s:f.e] = k
        covered = np.flatnonzero(fold_of >= 0)
        pls = np.full((n_bars, 2), np.nan)
        pls[covered] = to_ls(proba[covered])
        return cls(positions=covered, proba=proba, p_long_short=pls, fold=fold_of, rounds=[f.rounds for f in folds])


OOF_CACHE = "oof_signal.npz"  # in a run folder: the signal study's best trial's fold probabilities


def _oof_key(ds: Dataset, params: Mapping[str, Mapping[str, Any]], seed: int, n_jobs: int, tail_fraction: float,
             calibrate: bool) -> str:
    """Everything the out-of-fold probabilities depend on (data, folds, parameters, seed, threads, tail,
    calibration), as one string: a cache made under another key is not used."""
    ranges = [bar_range(va) for _, va in ds.splits.folds]
    return json.dumps({"data": ds.data_hash(), "oos_start": int(ds.splits.oos_start), "folds": ranges,
                       "params": {k: dict(v) for k, v in sorted(params.items())}, "seed": int(seed),
                       "n_jobs": int(n_jobs), "tail": float(tail_fraction), "calibrate": bool(calibrate)},
                      sort_keys=True, default=str)


def save_oof_cache(path: Path, ds: Dataset, kept: KeptFolds, seed: int) -> None:
    """Keep the best trial's fold probabilities for :func:`oof_signal_proba` (phase 6): they are exactly what it
    would compute again with the same settings (parameters, seed, threads, tail and calibration, all in the key:
    a call with other settings does not use them; tested)."""
    key = _oof_key(ds, kept.params, seed, kept.n_jobs, TAIL_FRACTION, kept.calibrate)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, key=np.array(key), trial=np.array(kept.number),
                     ranges=np.array([[f.s, f.e] for f in kept.folds], dtype=np.int64),
                     proba=np.concatenate([f.proba for f in kept.folds]),
                     rounds=np.array(json.dumps([f.rounds for f in kept.folds])))

    atomic_write(path, write)


def load_oof_cache(path: Path, ds: Dataset, key: str) -> OOFSignal | None:
    """The cached out-of-fold probabilities when ``path`` holds them under ``key``, else None."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            ranges, proba, rounds = z["ranges"], z["proba"], json.loads(str(z["rounds"]))
    except (OSError, ValueError, KeyError):
        return None
    folds, at = [], 0
    for (s, e), r in zip(ranges.tolist(), rounds, strict=True):
        folds.append(FoldProba(int(s), int(e), proba[at:at + e - s], r))
        at += e - s
    return OOFSignal.from_folds(ds.splits.n_bars, folds)


def oof_signal_proba(ds: Dataset, cfg: Config, params: Mapping[str, Mapping[str, Any]] | None = None,
                     n_jobs: int | None = None, tail_fraction: float = TAIL_FRACTION, calibrate: bool = True,
                     cache: Path | None = None) -> OOFSignal:
    """Out-of-fold ensemble probabilities on every bar of each fold's validation range (never the OOS window).

    Fold ``k``'s models are made by :class:`FoldModelPool` from that fold's training positions only (early
    stopping and calibration on the purged tail of those positions) and predict the bars of its validation range,
    so every probability is out of sample and calibrated, as the live signal would be: these are the position
    model's training inputs. ``params`` are merged over the models' defaults (nested as ``fit_signal_models`` takes
    them, e.g. ``results/best_params_signal.json`` key ``model_params``).

    ``cache``: a run folder's :data:`OOF_CACHE`, written by :func:`run_signal_study` from its best trial, whose
    folds are these very models; used when it was made under the same data, parameters, seed and settings (else
    the folds are fit here). Measured: 5.6 s of the real weekly run's position phase.
    """
    from ml.models.signal import SIGNAL_MODELS, combine_proba, default_params

    base = default_params()
    use = {name: {**base[name], **dict((params or {}).get(name, {}) or {})} for name in SIGNAL_MODELS}
    n_jobs = n_jobs or common.DEFAULT_THREADS
    seed = int(cfg.tuning.seed)
    if cache is not None:
        hit = load_oof_cache(Path(cache), ds, _oof_key(ds, use, seed, n_jobs, tail_fraction, calibrate))
        if hit is not None:
            guard_indices(hit.positions, int(ds.splits.oos_start), "cached out-of-fold bars")
            log.info("out-of-fold signal probabilities: the signal study's best trial's folds (%s)", cache)
            return hit
    oos_start = int(ds.splits.oos_start)
    folds: list[FoldProba] = []
    with FoldModelPool(ds) as pool:
        for k, (tr, va) in enumerate(ds.splits.folds):
            tr = guard_indices(train_rows(ds, tr), oos_start, f"fold {k} train")
            guard_indices(va, oos_start, f"fold {k} validation")
            s, e = bar_range(va)
            guard_indices([s, e - 1], oos_start, f"fold {k} prediction bars")
            _raw, cal, info = pool.fit_predict(tr, use, (s, e), seed, n_jobs=n_jobs, calibrate=calibrate,
                                               tail_fraction=tail_fraction)
            folds.append(FoldProba(s, e, combine_proba(cal), dict(info["rounds"])))
    return OOFSignal.from_folds(ds.splits.n_bars, folds)


if __name__ == "__main__":  # the seed's spelling of the command (cli.tune; upward import listed in pyproject.toml)
    from cli.tune import signal_entry

    signal_entry()
