"""The position (exit) model: for every bar on which a position is open, "exit at the next open, or hold on?".

Why a separate model: the signal decides *whether* to enter; once in, the best action depends on how the trade is
doing (age, unrealised result, room to the stop and the target) as well as on the market. The backtester evaluates
this model inside its compiled loop at every close with an open position (rule R12 of :mod:`backtest.policy`) and
exits at the next open when its probability reaches ``trading.exit_threshold``.

How the training rows are made (:func:`position_rows`)
------------------------------------------------------
Positions are simulated with the backtester's own rule functions, so training and backtest cannot disagree:

* a decision is taken at the close of bar ``t`` only when flat and only on the requested bar positions; the side is
  :func:`backtest.policy.entry_gate` of the calibrated ensemble's ``(p_long, p_short)`` (rules R3-R4: threshold,
  sessions, spread). The account breakers (daily loss, losing streak, drawdown halt) and the lot-size floor are NOT
  applied: they depend on the account, not on the position, and would only remove training examples;
* fill at the next open with costs, stop and target from the config's fixed ATR multiples (times the sweep's
  multipliers; rule R6 without SL/TP models, which are trained after this model), and the position walked by
  :func:`backtest.nb.simulate_exit` *without* a position model: stop / target / max holding only (R9-R13).
  Exactly one position at a time; the close of the exit bar may open the next one (R14);
* one row per close at which the backtester would ask the position model (a bar with the position still open that
  has not reached ``max_holding_bars``): :data:`backtest.policy.POSITION_STATE_FEATURES` filled by
  :func:`backtest.policy.position_state_features` (the kernel's own filler), followed by the bar's
  ``market_features``. This is exactly the row the kernel builds (``xbuf`` in :func:`backtest.policy.model_exit`).

The target (documented rule)
----------------------------
For the row at the close of bar ``b`` of a trade on side ``s``:

* ``exit_now``  = :func:`backtest.policy.exit_fill` of ``open[b + 1]`` (a model exit fills at the next open, costs
  paid);
* ``hold``      = the price at which the trade actually ended by stop / target / max holding in the simulation (costs
  paid, gaps honoured);
* ``gain_atr``  = ``s * (exit_now - hold) / atr[b]``, and the target ``y = 1`` iff ``gain_atr > 0`` (exiting now is
  strictly better than holding on to the rule-based outcome), else ``0``.

Trades that run into the end of the window (no observed outcome) are dropped with their rows. The window ends
``splits.embargo`` bars after the last requested position, which keeps every bar a trade reads inside the purged
region (the embargo is at least the label horizon, and ``fit`` / ``calib`` are purged by it).

``groups`` is the trade id of each row: all rows of one trade share an outcome, so cross-validation folds must
never split a trade (the Optuna study's purged folds use it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
from numba import njit

from backtest.nb import simulate_exit
from backtest.policy import (
    EXIT_END,
    FLAT,
    N_POS,
    POSITION_STATE_FEATURES,
    Params,
    decision_clock,
    entry_fill,
    entry_gate,
    exit_fill,
    make_params,
    position_state_features,
    stop_target_distances,
    stops_from_fill,
    time_exit,
)
from backtest.trees import CompiledTrees, compile_booster, empty_trees
from core.config import Config, default_config
from core.errors import TooFewTrades, UserError
from ml.models.manifest import SIGNAL_KEYS

DEFAULT_MARKET_FEATURES: list[str] = [
    # short-term momentum and mean-reversion context, volatility state and the hourly trend: what tells a trader that
    # a move is exhausting (exit) or continuing (hold). Side-dependence is left to the trees (they split on `side`).
    "ret_1", "ret_4", "ret_16", "rsi_14", "bb_z_20", "range_pos_20", "vol_ratio", "h1_rsi_14",
]

DEFAULT_PARAMS: dict[str, Any] = {
    # Small trees, strong leaf floor: rows of one trade are highly correlated, so the effective sample size is the
    # number of trades, not of rows. max_bin 63 keeps the histogram pass cheap (the Optuna study fits it 50+ times).
    "learning_rate": 0.05,
    "num_leaves": 15,
    "max_depth": -1,
    "min_data_in_leaf": 200,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "max_bin": 63,
    "num_boost_round": 300,
    "early_stopping_rounds": 30,
}
# forced for reproducibility (same seed + data -> bit-identical boosters): one thread, row-wise histograms (LightGBM's
# auto row/col choice is timing-based), deterministic mode; quiet.
_FIXED = {"deterministic": True, "force_row_wise": True, "num_threads": 1, "verbosity": -1}



# ============================================================================================== LightGBM helpers
def lgb_params(base: Mapping[str, Any], params: Mapping[str, Any] | None, seed: int,
               objective: Mapping[str, Any]) -> tuple[dict[str, Any], int, int]:
    """Merge ``base`` <- ``params`` <- the fixed reproducibility settings; returns (lgb params, rounds, early stop).

    Shared by the position, SL/TP and risk models so the three are trained the same deterministic way."""
    merged = {**base, **dict(params or {})}
    rounds = int(merged.pop("num_boost_round", merged.pop("n_estimators", 300)))
    merged.pop("n_estimators", None)
    es = int(merged.pop("early_stopping_rounds", 0) or 0)
    merged.update(objective)
    merged.update(_FIXED)
    merged["seed"] = int(seed)
    for k in ("bagging_seed", "feature_fraction_seed", "data_random_seed", "drop_seed", "extra_seed"):
        merged[k] = int(seed)
    return merged, max(1, rounds), es


def train_booster(X: np.ndarray, y: np.ndarray, params: dict[str, Any], rounds: int, early_stopping: int,
                  feature_names: Sequence[str], eval_set: tuple[np.ndarray, np.ndarray] | None = None,
                  weight: np.ndarray | None = None) -> tuple[lgb.Booster, dict[str, Any]]:
    """Train one LightGBM booster, early-stopped on ``eval_set`` when given, and return a *trimmed* booster.

    Trimming (re-loading the model string cut at the best iteration) means the saved booster holds exactly the trees
    it uses: ``booster.predict`` and :func:`backtest.trees.compile_booster` cannot disagree about the iteration."""
    names = [str(n) for n in feature_names]
    dtrain = lgb.Dataset(np.ascontiguousarray(X, dtype=np.float64), label=np.asarray(y, dtype=np.float64),
                         weight=weight, feature_name=names, free_raw_data=True)
    valid_sets, callbacks = [], []
    if eval_set is not None and len(eval_set[1]) > 0:
        dval = lgb.Dataset(np.ascontiguousarray(eval_set[0], dtype=np.float64),
                           label=np.asarray(eval_set[1], dtype=np.float64), reference=dtrain, feature_name=names)
        valid_sets = [dval]
        if early_stopping > 0:
            callbacks.append(lgb.early_stopping(early_stopping, first_metric_only=True, verbose=False))
    booster = lgb.train(params, dtrain, num_boost_round=rounds, valid_sets=valid_sets or None,
                        callbacks=callbacks or None)
    best = int(booster.best_iteration or 0) if valid_sets and early_stopping > 0 else 0
    used = best if best > 0 else booster.current_iteration()
    trimmed = lgb.Booster(model_str=booster.model_to_string(num_iteration=used))
    return trimmed, {"rounds": int(used), "early_stopped": bool(best > 0 and best < rounds)}


# ================================================================================================= the model
@dataclass
class PositionModel:
    """A LightGBM binary booster on ``POSITION_STATE_FEATURES + market_features`` (in that order).

    Saved as LightGBM model text + JSON (:meth:`to_archive`, never a pickle). The backtester compiles ``booster`` with
    :func:`backtest.trees.compile_booster` and feeds it the same row layout (``Predictor.exit_model``)."""

    booster: lgb.Booster
    market_features: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        """The model's input columns in order: the five position-state features, then the market features."""
        return [*POSITION_STATE_FEATURES, *self.market_features]

    def predict_exit(self, X_rows: np.ndarray) -> np.ndarray:  # noqa: N803 - rows of the documented layout
        """Exit probability of each row (float64 rows as built by :func:`position_rows`)."""
        X = np.atleast_2d(np.asarray(X_rows, dtype=np.float64))
        if X.shape[1] != len(self.feature_names):
            raise ValueError(f"position model expects {len(self.feature_names)} columns, got {X.shape[1]}")
        return np.asarray(self.booster.predict(X), dtype=np.float64)

    def compiled(self) -> CompiledTrees:
        """The booster as arrays for the compiled backtest loop."""
        return compile_booster(self.booster)

    def exit_model(self, feature_names: Sequence[str]) -> tuple[CompiledTrees, np.ndarray]:
        """``Predictor.exit_model`` for a predictor whose feature matrix has columns ``feature_names``."""
        names = list(feature_names)
        missing = [c for c in self.market_features if c not in names]
        if missing:
            raise UserError(f"position model needs feature columns {missing} that the feature list lacks")
        return self.compiled(), np.asarray([names.index(c) for c in self.market_features], dtype=np.int64)

    # ---------------------------------------------------------------------------- persistence (ml.models.archive)
    def to_archive(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        """(meta, members): the booster as LightGBM model text, everything else as JSON (no pickle)."""
        from ml.models.archive import lgb_text

        meta = {"type": "position", "market_features": list(self.market_features), "params": self.params,
                "seed": int(self.seed), "info": self.info}
        return meta, {"booster.lgb.txt": lgb_text(self.booster)}

    @classmethod
    def from_archive(cls, meta: Mapping[str, Any], files: Mapping[str, bytes], what: str) -> PositionModel:
        """Inverse of :meth:`to_archive` (the archive was verified by the caller)."""
        from ml.models.archive import lgb_from_text, member

        return cls(booster=lgb_from_text(member(files, "booster.lgb.txt", what), what),
                   market_features=[str(f) for f in meta["market_features"]], params=dict(meta["params"]),
                   seed=int(meta["seed"]), info=dict(meta["info"]))


# ============================================================================================ the simulation
@njit(cache=True)
def _simulate_positions(open_: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray,
                        spread: np.ndarray, atr: np.ndarray, hour: np.ndarray, p_long: np.ndarray,
                        p_short: np.ndarray, allowed: np.ndarray, start: int, end: int, p: Params,
                        no_trees: CompiledTrees, no_x: np.ndarray, t_fill: np.ndarray, t_side: np.ndarray,
                        t_entry: np.ndarray, t_stop: np.ndarray,
                        t_target: np.ndarray, t_exit_bar: np.ndarray, t_exit_px: np.ndarray, t_reason: np.ndarray,
                        r_bar: np.ndarray, r_trade: np.ndarray, r_state: np.ndarray, r_gain: np.ndarray
                        ) -> tuple[int, int]:
    """One-position-at-a-time trades over bars ``[start, end)`` and their position-model rows (module docstring).

    Returns ``(n_trades, n_rows)``; trades ending with ``EXIT_END`` are not counted and leave no rows."""
    xbuf = np.empty(N_POS)
    sbuf = np.empty(N_POS)
    n_tr = 0
    n_rows = 0
    t = start
    while t < end - 1:
        if not allowed[t]:
            t += 1
            continue
        side, _code = entry_gate(t, p_long[t], p_short[t], hour[t], spread[t], False, False, 0, p)
        if side == FLAT:
            t += 1
            continue
        sl_d, tp_d, ok = stop_target_distances(np.nan, np.nan, atr[t], False, p)
        if not ok:
            t += 1
            continue
        e = t + 1
        entry = entry_fill(open_[e], side, spread[e], p)
        stop, target = stops_from_fill(entry, side, sl_d, tp_d)
        xb, xp, xr = simulate_exit(e, side, entry, stop, target, open_, high, low, close, spread, atr, no_x,
                                   no_trees, False, xbuf, end, p)
        if xr == EXIT_END:
            break  # the outcome lies beyond the window: no label; nothing can follow it either
        t_fill[n_tr] = e
        t_side[n_tr] = side
        t_entry[n_tr] = entry
        t_stop[n_tr] = stop
        t_target[n_tr] = target
        t_exit_bar[n_tr] = xb
        t_exit_px[n_tr] = xp
        t_reason[n_tr] = xr
        for b in range(e, xb):
            if time_exit(b, e, p) != 0:
                break  # R12: the time exit comes first; the position model is not asked at this close
            position_state_features(sbuf, side, b - e + 1, close[b], entry, stop, target, atr[b])
            r_bar[n_rows] = b
            r_trade[n_rows] = n_tr
            for k in range(N_POS):
                r_state[n_rows, k] = sbuf[k]
            now = exit_fill(open_[b + 1], side, spread[b + 1], p)
            r_gain[n_rows] = side * (now - xp) / atr[b] if atr[b] > 0.0 else np.nan
            n_rows += 1
        n_tr += 1
        t = xb  # R14: the close of the exit bar may open the next position
    return n_tr, n_rows


@dataclass
class SimTrades:
    """The simulated trades behind a set of position rows (bars are positions in the dataset)."""

    fill_bar: np.ndarray
    side: np.ndarray
    entry: np.ndarray
    stop: np.ndarray
    target: np.ndarray
    exit_bar: np.ndarray
    exit_price: np.ndarray
    reason: np.ndarray

    @property
    def n(self) -> int:
        return int(self.fill_bar.size)


@dataclass
class PositionRows:
    """Training rows of the position model: ``X`` (float64, columns ``feature_names``), target ``y`` (0/1),
    ``groups`` (trade id), ``bars`` (dataset position of each row's bar), ``gain_atr`` (exit-now minus hold, in ATR
    at the row's bar) and the trades themselves."""

    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    bars: np.ndarray
    gain_atr: np.ndarray
    feature_names: list[str]
    trades: SimTrades

    def stats(self) -> dict[str, Any]:
        """Counts and outcome summary for reports (the exit share shows how often cutting early would have paid)."""
        tr = self.trades
        hold_atr = np.zeros(0)
        if tr.n:
            a = np.abs(tr.entry - tr.stop)
            hold_atr = tr.side * (tr.exit_price - tr.entry) / np.where(a > 0, a, np.nan)
        return {"n_rows": int(self.y.size), "n_trades": tr.n, "exit_share": float(self.y.mean()) if self.y.size else
                0.0, "mean_hold_r": float(np.nanmean(hold_atr)) if hold_atr.size else 0.0,
                "rows_per_trade": float(self.y.size / tr.n) if tr.n else 0.0}


def full_probabilities(p_long_short: np.ndarray, n_bars: int, positions: np.ndarray) -> np.ndarray:
    """``(n_bars, 2)`` probabilities: accepts either one row per bar or one row per requested position (scattered
    into a NaN array, NaN meaning "no signal")."""
    p = np.asarray(p_long_short, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"p_long_short must be (n, 2), got {p.shape}")
    if p.shape[0] == n_bars:
        return p
    if p.shape[0] == positions.size:
        out = np.full((n_bars, 2), np.nan)
        out[positions] = p
        return out
    raise ValueError(f"p_long_short has {p.shape[0]} rows: expected {n_bars} (all bars) or {positions.size} "
                     "(one per position)")


def position_rows(ds: Any, p_long_short: np.ndarray, cfg: Config | None, positions: np.ndarray,
                  market_features: Sequence[str] | None = None, params: Params | None = None) -> PositionRows:
    """Simulate the positions entered on ``positions`` and build their rows and targets (module docstring).

    ``ds`` is a :class:`market.dataset.Dataset` (candles + features); ``p_long_short`` the calibrated ensemble's
    ``[p_long, p_short]`` per bar (or per position); ``params`` overrides the config's trading parameters
    (:func:`backtest.policy.make_params`)."""
    cfg = cfg or default_config()
    p = params if params is not None else make_params(cfg)
    mf = list(market_features) if market_features is not None else list(DEFAULT_MARKET_FEATURES)
    names = list(ds.features.columns)
    missing = [c for c in mf if c not in names]
    if missing:
        raise UserError(f"position model market features {missing} are not produced by market.features")
    positions = np.asarray(positions, dtype=np.int64)
    candles = ds.candles
    n = len(candles)
    empty = PositionRows(np.zeros((0, N_POS + len(mf))), np.zeros(0, np.int8), np.zeros(0, np.int64),
                         np.zeros(0, np.int64), np.zeros(0), [*POSITION_STATE_FEATURES, *mf],
                         SimTrades(*(np.zeros(0, dt) for dt in (np.int64, np.int64, float, float, float, np.int64,
                                                                  float, np.int64))))
    if positions.size == 0:
        return empty
    pls = full_probabilities(p_long_short, n, positions)
    allowed = np.zeros(n, dtype=np.bool_)
    allowed[positions] = True
    embargo = int(getattr(getattr(ds, "splits", None), "embargo", cfg.splits.embargo_bars))
    start = int(positions[0])
    end = min(n, int(positions[-1]) + 1 + embargo)
    col = lambda name: np.ascontiguousarray(candles[name].to_numpy(np.float64))  # noqa: E731
    atr = ds.features["atr"].to_numpy(np.float32).astype(np.float64)  # exactly what backtest.engine uses
    hour, _day = decision_clock(candles.index.as_unit("ns").asi8)
    cap = max(1, end - start)
    ints = lambda: np.empty(cap, dtype=np.int64)  # noqa: E731
    flts = lambda: np.empty(cap, dtype=np.float64)  # noqa: E731
    t_fill, t_side, t_entry, t_stop, t_target = ints(), ints(), flts(), flts(), flts()
    t_exit_bar, t_exit_px, t_reason = ints(), flts(), ints()
    r_bar, r_trade, r_state, r_gain = ints(), ints(), np.empty((cap, N_POS)), flts()
    n_tr, n_rows = _simulate_positions(
        col("open"), col("high"), col("low"), col("close"), col("spread"), atr, np.ascontiguousarray(hour),
        np.ascontiguousarray(pls[:, 0]), np.ascontiguousarray(pls[:, 1]), allowed, start, end, p,
        empty_trees(0), np.zeros((n, 0)), t_fill, t_side, t_entry, t_stop, t_target, t_exit_bar, t_exit_px,
        t_reason, r_bar, r_trade, r_state, r_gain)
    trades = SimTrades(t_fill[:n_tr].copy(), t_side[:n_tr].copy(), t_entry[:n_tr].copy(), t_stop[:n_tr].copy(),
                       t_target[:n_tr].copy(), t_exit_bar[:n_tr].copy(), t_exit_px[:n_tr].copy(),
                       t_reason[:n_tr].copy())
    bars = r_bar[:n_rows].copy()
    cols = [names.index(c) for c in mf]
    market = ds.features.to_numpy(np.float32)[bars][:, cols].astype(np.float64)
    X = np.ascontiguousarray(np.hstack([r_state[:n_rows], market]))
    gain = r_gain[:n_rows].copy()
    y = (gain > 0.0).astype(np.int8)
    return PositionRows(X=X, y=y, groups=r_trade[:n_rows].copy(), bars=bars, gain_atr=gain,
                        feature_names=[*POSITION_STATE_FEATURES, *mf], trades=trades)


def position_dataset(ds: Any, p_long_short: np.ndarray, cfg: Config | None,
                     positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X, y, groups)`` for the default market features: see :func:`position_rows` for everything else."""
    rows = position_rows(ds, p_long_short, cfg, positions)
    return rows.X, rows.y, rows.groups


# ================================================================================================ fit + metrics
def fit_position_model(X: np.ndarray, y: np.ndarray, params: Mapping[str, Any] | None, seed: int,
                       eval_set: tuple[np.ndarray, np.ndarray] | None = None, *,
                       market_features: Sequence[str] | None = None,
                       sample_weight: np.ndarray | None = None) -> PositionModel:
    """LightGBM binary classifier on position rows; early-stopped on ``eval_set`` (binary log loss) when given.

    ``params`` are LightGBM parameters over :data:`DEFAULT_PARAMS` (``num_boost_round``/``n_estimators`` and
    ``early_stopping_rounds`` are understood). Deterministic: one thread, fixed seeds (same inputs -> identical
    booster)."""
    mf = list(market_features) if market_features is not None else list(DEFAULT_MARKET_FEATURES)
    X = np.asarray(X, dtype=np.float64)
    if X.shape[1] != N_POS + len(mf):
        raise ValueError(f"X has {X.shape[1]} columns; expected {N_POS} state + {len(mf)} market features")
    y = np.asarray(y)
    if y.size == 0 or np.unique(y).size < 2:
        raise TooFewTrades(f"position model: need both exit and hold examples, got {y.size} rows with classes "
                        f"{np.unique(y).tolist()} (too little data or threshold too high)")
    lp, rounds, es = lgb_params(DEFAULT_PARAMS, params, seed, {"objective": "binary", "metric": "binary_logloss"})
    booster, info = train_booster(X, y, lp, rounds, es, [*POSITION_STATE_FEATURES, *mf], eval_set, sample_weight)
    used = {k: v for k, v in lp.items() if k not in _FIXED and not k.endswith("_seed") and k != "seed"}
    used.update(num_boost_round=info["rounds"], early_stopping_rounds=es)
    return PositionModel(booster=booster, market_features=mf, params=used, seed=int(seed), info=info)


def position_metrics(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    """Classification metrics at the trading ``threshold`` (``trading.exit_threshold``).

    ``exit_precision``: of the rows the model would exit on, the share where exiting truly beat holding (0 when it
    never exits: an exit model that never exits is useless, not perfect). ``objective`` = accuracy x exit_precision,
    the Optuna position study's objective."""
    y = np.asarray(y).astype(np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    pred = (prob >= threshold).astype(np.int64)
    n = int(y.size)
    tp = int(np.sum((pred == 1) & (y == 1)))
    n_pred = int(pred.sum())
    n_pos = int(y.sum())
    acc = float(np.mean(pred == y)) if n else 0.0
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_pos if n_pos else 0.0
    pc = np.clip(prob, 1e-7, 1 - 1e-7)
    out = {
        "n": n, "accuracy": acc, "exit_precision": float(prec), "exit_recall": float(rec),
        "exit_rate": float(n_pred / n) if n else 0.0, "base_rate": float(n_pos / n) if n else 0.0,
        "majority_accuracy": float(max(n_pos, n - n_pos) / n) if n else 0.0,
        "log_loss": float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))) if n else float("nan"),
        "brier": float(np.mean((prob - y) ** 2)) if n else float("nan"),
        "auc": float("nan"), "objective": acc * prec, "threshold": float(threshold),
    }
    if 0 < n_pos < n:
        from sklearn.metrics import roc_auc_score

        out["auc"] = float(roc_auc_score(y, prob))
    return out


# ================================================================================================== training
def signal_probabilities(models_dir: Path, ds: Any, positions: np.ndarray) -> np.ndarray:
    """``(n_bars, 2)`` ``[p_long, p_short]`` of the saved calibrated ensemble on ``positions`` (NaN elsewhere).

    Only the requested bars are predicted: the forest's ``predict_proba`` on every bar would cost seconds for
    nothing."""
    from ml.models import manifest
    from ml.models.signal import ensemble_proba, p_long_short

    # verified (sha256 + feature list) before unpickling; keyed "rf"/"xgb"/"lgb" as ensemble_proba expects
    models = {k.removeprefix("signal_"): manifest.load_model(models_dir, k, list(ds.feature_names))
              for k in SIGNAL_KEYS}
    positions = np.asarray(positions, dtype=np.int64)
    out = np.full((len(ds.candles), 2), np.nan)
    if positions.size:
        out[positions] = p_long_short(ensemble_proba(models, ds.X[positions]))
    return out


def require_models(models_dir: Path, keys: Sequence[str], for_what: str) -> None:
    """The manifest's prerequisite check (clear :class:`UserError` naming what is missing and what to run)."""
    from ml.models import manifest

    manifest.require(Path(models_dir), list(keys), for_what)


def train_position(ds: Any, cfg: Config | None, models_dir_with_signal: Path | str,
                   params: Mapping[str, Any] | None = None, market_features: Sequence[str] | None = None, *,
                   fit_p_long_short: np.ndarray | None = None) -> tuple[PositionModel, dict[str, Any]]:
    """Train the position model on the simulated positions of ``ds.splits.fit``, early-stopped and scored on those
    of ``ds.splits.calib`` (later, purged, and never seen by the signal's base models).

    Requires the saved signal ensemble in ``models_dir_with_signal`` (:class:`UserError` otherwise); its calibrated
    probabilities drive the entries. On ``fit`` those are in-sample for the base models (their trades look better
    than live ones); a caller that has out-of-fold probabilities (``ml.tune.hyperparams.oof_signal_proba``) can pass
    them as ``fit_p_long_short`` (``(n_bars, 2)``, NaN = no entry) for the fit window; ``calib`` always uses the saved
    models."""
    cfg = cfg or default_config()
    models_dir = Path(models_dir_with_signal)
    require_models(models_dir, SIGNAL_KEYS, "position model")
    t0 = time.perf_counter()
    sp = ds.splits
    fit_pos, cal_pos = np.asarray(sp.fit, np.int64), np.asarray(sp.calib, np.int64)
    if fit_p_long_short is None:
        pls = signal_probabilities(models_dir, ds, np.concatenate([fit_pos, cal_pos]))
        fit_pls = pls
    else:
        pls = signal_probabilities(models_dir, ds, cal_pos)
        fit_pls = full_probabilities(fit_p_long_short, len(ds.candles), fit_pos)
    t_sig = time.perf_counter() - t0
    tr = position_rows(ds, fit_pls, cfg, fit_pos, market_features)
    va = position_rows(ds, pls, cfg, cal_pos, market_features)
    t_rows = time.perf_counter() - t0 - t_sig
    if tr.y.size < 50 or va.y.size < 10:
        raise TooFewTrades(f"position model: only {tr.trades.n} training / {va.trades.n} validation trades "
                        f"(rows {tr.y.size} / {va.y.size}); lower trading.confidence_threshold or add history")
    seed = int(cfg.tuning.seed)
    model = fit_position_model(tr.X, tr.y, params, seed, eval_set=(va.X, va.y), market_features=market_features)
    t_fit = time.perf_counter() - t0 - t_sig - t_rows
    thr = cfg.trading.exit_threshold
    metrics = {
        "val": position_metrics(va.y, model.predict_exit(va.X), thr),
        "train": position_metrics(tr.y, model.predict_exit(tr.X), thr),
        "rows": {"train": tr.stats(), "val": va.stats()},
        "rounds": model.info.get("rounds"),
        "fit_probabilities": "saved models (in-sample on fit)" if fit_p_long_short is None else "given (out-of-fold)",
        "timings_s": {"signal_proba": round(t_sig, 3), "rows": round(t_rows, 3), "fit": round(t_fit, 3)},
    }
    idx = ds.candles.index
    model.info.update(train_range={"start": str(idx[int(fit_pos[0])]), "end": str(idx[int(cal_pos[-1])]),
                                   "n_rows_fit": int(tr.y.size), "n_rows_val": int(va.y.size)},
                      data_hash=ds.data_hash(np.arange(int(fit_pos[0]), min(len(idx), int(cal_pos[-1]) + 1 +
                                                                          int(sp.embargo)))))
    return model, metrics


# ============================================================================================== numba cache
def _purge_stale_numba_cache() -> None:
    """Drop this package's cached machine code when the backtest rules it inlines (or these modules) changed, so
    training never drifts from the backtest (see :mod:`backtest.numba_cache`)."""
    from backtest.numba_cache import purge_stale_cache

    here = Path(__file__).resolve().parent
    backtest_dir = here.parent.parent / "backtest"
    purge_stale_cache(_simulate_positions,
                      [*(backtest_dir / n for n in ("trees.py", "policy.py", "nb.py")),
                       *(here / n for n in ("position.py", "sltp.py", "risk.py"))],
                      ("position.", "sltp.", "risk."), "models_numba_deps.sha")


_purge_stale_numba_cache()
