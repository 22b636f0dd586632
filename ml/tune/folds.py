"""One fold of the signal study: its rows, its three models and its backtest.

* :func:`train_rows`, :func:`fold_rows`, :func:`bar_range`: which positions a fold fits on (CUSUM events, the purged
  head and the later tail the boosters stop early on and the models are calibrated on) and which bars it trades;
* :class:`FoldModelPool`: the fold's three models fit side by side (worker processes by default) and their raw and
  calibrated probabilities on the fold's bars;
* :class:`FoldBacktester`: the compiled fast backtest of a fold's probabilities with the active trading params.

The objective and the study that use them are in :mod:`ml.tune.hyperparams`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from core.config import Config
from market.dataset import Dataset
from ml.tune import common
from ml.tune.common import guard_indices

log = logging.getLogger("ml.tune")

TAIL_FRACTION = 0.15  # last share of a fold's training positions used for early stopping + calibration


class _NoSignal:
    """A predictor that never signals: only used to build the state-independent backtest arrays once per study; the
    fold's probabilities are swapped in per fold (see :class:`FoldBacktester`)."""

    name = "tuning placeholder (no signal)"

    def __init__(self, feature_names: list[str]) -> None:
        self._names = list(feature_names)

    @property
    def feature_names(self) -> list[str]:
        return self._names

    def signal_proba(self, X: np.ndarray) -> np.ndarray:
        return np.zeros((X.shape[0], 2), dtype=np.float64)

    def sltp(self, X: np.ndarray) -> None:
        return None

    @property
    def exit_model(self) -> None:
        return None

    @property
    def risk_model(self) -> None:
        return None


class FoldBacktester:
    """The fast backtest of one fold's probabilities over a bar range, with the active trading params.

    The candle/ATR/clock arrays are prepared once per study; each call gets a shallow copy with its own probability
    arrays and output buffers, so parallel trials (threads) never share mutable state. Windows are split at data
    gaps longer than ``data.max_gap_minutes`` (the engine refuses to run across one); the drawdown is the worst of
    the pieces.
    """

    def __init__(self, ds: Dataset, cfg: Config) -> None:
        from backtest.engine import prepare_arrays
        from backtest.policy import make_params

        self.oos_start = int(ds.splits.oos_start)
        self.cfg = cfg
        self.params = make_params(cfg)
        self.base = prepare_arrays(ds.candles, ds.features, _NoSignal(ds.feature_names), cfg)

    def run(self, start: int, end: int, pls: np.ndarray) -> dict[str, float]:
        """Backtest bars ``[start, end)`` with ``pls[i - start] = (p_long, p_short)``; returns dd % and trades."""
        from backtest.engine import run_arrays

        guard_indices([start, end - 1], self.oos_start, "backtest window")
        n = self.base.n
        p_long = np.zeros(n)
        p_short = np.zeros(n)
        p_long[start:end] = pls[:, 0]
        p_short[start:end] = pls[:, 1]
        arrays = dataclasses.replace(self.base, p_long=p_long, p_short=p_short, _paths=OrderedDict(), _ws={})
        gaps = self.base.gaps[(self.base.gaps > start) & (self.base.gaps < end)]
        cuts = [start, *[int(g) for g in gaps], end]
        dd, trades, ret = 0.0, 0, 0.0
        for s, e in zip(cuts[:-1], cuts[1:], strict=True):
            if e - s < 2:
                continue
            m = run_arrays(arrays, self.params, s, e, memo_paths=False, check=False).metrics(
                arrays, self.cfg.profile.min_trades)
            dd = max(dd, float(m["max_drawdown_pct"]))
            trades += int(m["trades"])
            ret += float(m["return_pct"])
        return {"max_drawdown_pct": dd, "trades": trades, "return_pct": ret}


def train_rows(ds: Dataset, tr: np.ndarray) -> np.ndarray:
    """Training positions ∩ CUSUM events (the splits already hold events only; intersecting again is free and keeps
    a hand-made Dataset honest)."""
    ev = np.asarray(ds.events, dtype=bool)
    return tr[ev[tr]] if ev.size == ds.splits.n_bars else tr


def bar_range(va: np.ndarray) -> tuple[int, int]:
    """The contiguous bar range ``[first, last + 1)`` a validation block covers (what the backtest trades on)."""
    return int(va[0]), int(va[-1]) + 1


def _purged_tail(tr: np.ndarray, t1: np.ndarray, embargo: int, frac: float) -> tuple[np.ndarray, np.ndarray]:
    """Split training positions into (fit, tail): the chronologically last ``frac`` is the tail; the fit part is
    purged against it (labels end before the tail starts, at least ``embargo`` bars away)."""
    cut = int(tr[int(tr.size * (1 - frac))])
    tail = tr[tr >= cut]
    head = tr[tr < cut]
    head = head[(t1[head] < cut) & (head + embargo < cut)]
    return head, tail


def fold_rows(ds: Dataset, tr: np.ndarray, tail_fraction: float = TAIL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, tail rows) of a fold's training positions: the purged head and the later tail the boosters stop
    early on and every model is calibrated on; ``tail`` is empty when the fold is too small for one (then all of
    ``tr`` is fit, without early stopping or calibration)."""
    t1 = ds.labels["t1"].to_numpy(np.int64)
    y = ds.y
    head, tail = _purged_tail(tr, t1, int(ds.splits.embargo), tail_fraction)
    if head.size < 100 or tail.size < 30 or np.unique(y[tail]).size < 3 or np.unique(y[head]).size < 3:
        head, tail = tr, np.empty(0, dtype=np.int64)
    return head, tail


def _fit_one(X: np.ndarray, y: np.ndarray, head: np.ndarray, tail: np.ndarray, name: str,
             params: Mapping[str, Any], seed: int, n_jobs: int, calibrate: bool) -> tuple[Any, Any]:
    """One model of a fold, made the way the production models are made, on the fold's training rows only.

    The boosters early-stop on the purged later ``tail`` of the fold's training positions and, with ``calibrate``,
    the model is then calibrated on that same tail (:func:`ml.models.signal.calibrate_models`), like
    ``train_signal`` does with its calib slice. Why not early-stop on the validation block: the block is what the
    fold is scored on, and choosing the round count there inflates the low-learning-rate trials. Why calibrate: the
    fold's backtest trades when a probability passes ``confidence_threshold``, which is a calibrated probability in
    production; raw forest/booster scores rarely pass it, so an uncalibrated fold barely trades and its drawdown
    term means little. Returns ``(raw model, calibrated model)`` (the same object without a tail or ``calibrate``).
    """
    from ml.models.signal import calibrate_models, fit_signal_models

    Xt, yt = X[tail], y[tail]
    eval_set = (Xt, yt) if tail.size else None
    model = fit_signal_models(X[head], y[head], {name: params}, seed, n_jobs=n_jobs, eval_set=eval_set)[name]
    return model, (calibrate_models({name: model}, Xt, yt)[name] if calibrate and tail.size else model)


# A FoldModelPool worker process's copy of the data (X as float32, y), set once by its initializer.
_WORKER_DATA: tuple[np.ndarray, np.ndarray] | None = None


def _init_worker(X: np.ndarray, y: np.ndarray) -> None:
    """Start of a worker process: keep the data, one thread for every native thread pool (OpenMP, BLAS), and the
    model libraries imported before the first task."""
    global _WORKER_DATA
    _WORKER_DATA = (X, y)
    import lightgbm  # noqa: F401
    import sklearn.ensemble  # noqa: F401
    import xgboost  # noqa: F401
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _fit_predict_one(X: np.ndarray | None, y: np.ndarray | None, name: str, params: Mapping[str, Any],
                     head: np.ndarray, tail: np.ndarray, bars: tuple[int, int], seed: int, n_jobs: int,
                     calibrate: bool) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Fit one model of a fold (:func:`_fit_one`) and return its raw and calibrated (n, 3) probabilities on the
    bars ``[s, e)`` and its boosting rounds (``X`` None: a worker process's own copy of the data)."""
    from ml.models.signal import raw_and_calibrated_proba, rounds_used

    if X is None or y is None:
        assert _WORKER_DATA is not None, "a FoldModelPool worker without its data"
        X, y = _WORKER_DATA
    model, cal = _fit_one(X, y, head, tail, name, params, seed, n_jobs, calibrate)
    raw, calibrated = raw_and_calibrated_proba(model, cal, X[bars[0]:bars[1]])
    return raw, calibrated, rounds_used(model)


class FoldModelPool:
    """Fits a fold's three models side by side and returns their probabilities on the fold's bars.

    The three models are independent (own seed, own single-threaded library), so they are fit at the same time:
    in worker processes by default (two on this 2-core machine), else in threads of this process. Why processes:
    the forest's fit is mostly Python on these small folds (1-6k rows) and holds the GIL, so threads keep ~1.3 of 2
    cores busy, and a library's native thread pool left at its default spins on the core the other model needs:
    measured on the real fold 0 (16 parameter sets), threads 0.68-0.79 s per fold; two processes whose native
    pools are limited to one thread (``threadpoolctl``) 0.47 s per fold at the same CPU time as one process. Each
    worker gets the float32 feature matrix and the labels once, when it starts (forkserver: it never inherits this
    process's threads, numba state or OpenMP pools); a task sends row indices and parameters and gets the (n, 3)
    probabilities back, never a model. The pool lives as long as the study.

    The numbers are the same bits in processes, in threads and one model after the other, and the same as fitting
    the models and calling :func:`ml.models.signal.ensemble_proba` (tested): a row's prediction does not depend on
    the other rows, so predicting the fold's whole bar range once serves both the F1 on its scored bars and the
    backtest. Inside a daemonic process (a Dask worker may not have children) or with one core, threads are used.
    """

    def __init__(self, ds: Dataset, workers: int | None = None, processes: bool | None = None) -> None:
        import multiprocessing

        from ml.models.signal import SIGNAL_MODELS

        self.ds = ds
        self.workers = max(1, min(len(SIGNAL_MODELS), workers or common.cores()))
        self._X = np.ascontiguousarray(ds.X, dtype=np.float32)  # what every model sees (fit_signal_models)
        self._y = np.asarray(ds.y, dtype=np.int64)
        if processes is None:
            processes = self.workers > 1 and not multiprocessing.current_process().daemon
        self.processes = bool(processes)
        self._pool: Any
        if self.processes:
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("forkserver"),
                                             initializer=_init_worker, initargs=(self._X, self._y))
            for _ in range(self.workers):  # start the workers now: their imports overlap the study's set-up
                self._pool.submit(int)
        else:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fold-model")

    def fit_predict(self, tr: np.ndarray, params: Mapping[str, Mapping[str, Any]], bars: tuple[int, int],
                    seed: int, n_jobs: int = 1, calibrate: bool = True, tail_fraction: float = TAIL_FRACTION
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
        """``(raw probabilities, calibrated probabilities, info)`` of the fold trained on ``tr`` over ``bars``
        (each a dict model name -> (e - s, 3) array; ``info``: boosting rounds used and row counts)."""
        from concurrent.futures.process import BrokenProcessPool

        from ml.models.signal import check_model_names

        head, tail = fold_rows(self.ds, tr, tail_fraction)
        names = check_model_names(params)  # the forest first: the longest fit starts first
        data = (None, None) if self.processes else (self._X, self._y)  # a worker process holds its own copy
        try:
            out = [f.result() for f in [self._pool.submit(_fit_predict_one, *data, name, dict(params[name]), head,
                                                          tail, (int(bars[0]), int(bars[1])), int(seed),
                                                          int(n_jobs), bool(calibrate)) for name in names]]
        except BrokenProcessPool as exc:  # a worker died (killed, out of memory, a main module without a guard)
            log.warning("fold model workers lost (%s): the study goes on with threads (same numbers)", exc)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.processes = False
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fold-model")
            return self.fit_predict(tr, params, bars, seed, n_jobs, calibrate, tail_fraction)
        raw = {name: o[0] for name, o in zip(names, out, strict=True)}
        cal = {name: o[1] for name, o in zip(names, out, strict=True)}
        info = {"rounds": {name: o[2] for name, o in zip(names, out, strict=True) if name != "rf"},
                "n_fit": int(head.size), "n_tail": int(tail.size), "calibrated": bool(calibrate and tail.size)}
        return raw, cal, info

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> FoldModelPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
