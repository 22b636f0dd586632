"""The risk model: a LightGBM regressor from the account state at an entry to a risk multiplier.

Why: the same signal deserves different sizes in different account states: after a string of losses in a
volatility regime where the signal has not paid, size down; where it has paid, size up. The backtester evaluates the
booster inside its compiled loop (rule R8 of :mod:`backtest.policy`) on exactly
:data:`backtest.policy.ACCOUNT_STATE_FEATURES` (in that order) and clamps its output to
``[trading.risk_multiplier_min, trading.risk_multiplier_max]``.

Labels (documented rule, :func:`risk_labels`)
---------------------------------------------
1. A FULL fast backtest (:func:`backtest.engine.run_arrays`, breakers and all) over the training window
   ``[splits.train[0], splits.train[-1]]`` with the new signal, position and SL/TP models and **no** risk model
   (multiplier 1.0), so the labels do not depend on a previous risk model. Every rule applies (costs, sizing, daily
   loss and losing-streak breakers) except the drawdown *halt*: it would end the labelling run at the first deep
   drawdown and leave the rest of the window unlabelled (the live halt is unaffected).
2. For each trade ``i`` in time order: the account-state row at its decision (the close before its fill bar),
   rebuilt by replaying the trades through :func:`backtest.policy.book_exit` and
   :func:`backtest.policy.account_state_features` (the kernel's own functions, so the row equals what the kernel
   would feed the model at that decision; a test checks this against the kernel), and its realised ``R`` (pnl /
   money at risk at the stop, round-trip commission included, as the engine reports it).
3. Smoothed outcome ``s_i`` = mean of ``clip(R_j, -R_CAP, R_CAP)`` over this trade and the next ``WINDOW - 1``
   trades. The account state changes slowly (drawdown, win rate, streak), so it predicts the next few trades at best;
   one trade's R is mostly noise, and the cap keeps one outlier from dominating.
4. Centred and scaled: ``z_i = (s_i - mean(s)) / std(s)`` over the window's trades, and
   ``target_i = clip(1 + K * z_i, risk_multiplier_min, risk_multiplier_max)``. Centring means the average target is
   about 1: the model *redistributes* risk between states (up where trades paid, down where they lost) instead of
   scaling overall risk, which is ``risk_percent``'s job (and which in-sample trades would inflate).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
from numba import njit

from backtest.policy import (
    ACCOUNT_STATE_FEATURES,
    N_ACC,
    RING,
    VOL_REGIME_BARS,
    Account,
    Params,
    account_state_features,
    book_exit,
    decision_clock,
    initial_account,
    make_params,
    replace_params,
    vol_regime_series,
)
from backtest.trees import CompiledTrees, compile_booster
from core.config import Config, default_config
from core.errors import TooFewTrades
from ml.models.manifest import SIGNAL_KEYS
from ml.models.position import lgb_params, require_models, train_booster

WINDOW = 5
R_CAP = 3.0
K = 0.25
MIN_TRADES = 50
VAL_FRACTION = 0.25

DEFAULT_PARAMS: dict[str, Any] = {
    # six inputs and a few hundred to a few thousand trades: shallow trees, a big leaf floor, strong L2
    "learning_rate": 0.05,
    "num_leaves": 7,
    "min_data_in_leaf": 30,
    "feature_fraction": 1.0,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 5.0,
    "max_bin": 63,
    "num_boost_round": 300,
    "early_stopping_rounds": 30,
}


@dataclass
class RiskModel:
    """A LightGBM regression booster on :data:`ACCOUNT_STATE_FEATURES`, bounded to ``[mult_min, mult_max]``."""

    booster: lgb.Booster
    mult_min: float
    mult_max: float
    feature_names: list[str] = field(default_factory=lambda: list(ACCOUNT_STATE_FEATURES))
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def multiplier(self, state_rows: np.ndarray) -> np.ndarray:
        """Risk multipliers for account-state rows, clamped like rule R8 (NaN prediction -> 1.0)."""
        X = np.atleast_2d(np.asarray(state_rows, dtype=np.float64))
        if X.shape[1] != N_ACC:
            raise ValueError(f"risk model expects {N_ACC} columns {ACCOUNT_STATE_FEATURES}, got {X.shape[1]}")
        raw = np.asarray(self.booster.predict(X), dtype=np.float64)
        out = np.clip(raw, self.mult_min, self.mult_max)
        out[np.isnan(raw)] = 1.0
        return out

    def compiled(self) -> CompiledTrees:
        """The booster as arrays (what ``Predictor.risk_model`` returns)."""
        return compile_booster(self.booster)

    # ---------------------------------------------------------------------------- persistence (ml.models.archive)
    def to_archive(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        """(meta, members): the booster as LightGBM model text, everything else as JSON (no pickle)."""
        from ml.models.archive import lgb_text

        meta = {"type": "risk", "mult_min": float(self.mult_min), "mult_max": float(self.mult_max),
                "feature_names": list(self.feature_names), "params": self.params, "seed": int(self.seed),
                "info": self.info}
        return meta, {"booster.lgb.txt": lgb_text(self.booster)}

    @classmethod
    def from_archive(cls, meta: Mapping[str, Any], files: Mapping[str, bytes], what: str) -> RiskModel:
        """Inverse of :meth:`to_archive` (the archive was verified by the caller)."""
        from ml.models.archive import lgb_from_text, member

        return cls(booster=lgb_from_text(member(files, "booster.lgb.txt", what), what),
                   mult_min=float(meta["mult_min"]), mult_max=float(meta["mult_max"]),
                   feature_names=[str(f) for f in meta["feature_names"]], params=dict(meta["params"]),
                   seed=int(meta["seed"]), info=dict(meta["info"]))


# ================================================================================================== labels
def risk_labels(r_multiple: np.ndarray, mult_min: float, mult_max: float, *, window: int = WINDOW,
                r_cap: float = R_CAP, k: float = K) -> np.ndarray:
    """Target multipliers for trades in time order from their realised R (module docstring, steps 3-4)."""
    r = np.clip(np.asarray(r_multiple, dtype=np.float64), -r_cap, r_cap)
    n = r.size
    if n == 0:
        return np.zeros(0)
    c = np.concatenate([[0.0], np.cumsum(r)])
    hi = np.minimum(np.arange(n) + window, n)
    s = (c[hi] - c[:n]) / (hi - np.arange(n))
    sd = float(s.std())
    z = (s - s.mean()) / sd if sd > 0 else np.zeros(n)
    return np.clip(1.0 + k * z, mult_min, mult_max)


@njit(cache=True)
def _replay_states(fill_bar: np.ndarray, exit_bar: np.ndarray, side: np.ndarray, entry: np.ndarray,
                   exit_px: np.ndarray, size: np.ndarray, stop: np.ndarray, hour: np.ndarray,
                   vol_regime: np.ndarray, p: Params, out: np.ndarray) -> None:
    """Account-state rows at each trade's decision, replaying the closed trades as the kernel books them."""
    acc = initial_account(p.initial_equity)
    ring_win = np.zeros(RING)
    ring_eq = np.zeros(RING)
    abuf = np.empty(N_ACC)
    for k in range(fill_bar.size):
        d = fill_bar[k] - 1
        account_state_features(abuf, acc.equity, acc.peak, acc.loss_streak, ring_win, ring_eq, acc.n_closed,
                               vol_regime[d], hour[d])
        for j in range(N_ACC):
            out[k, j] = abuf[j]
        # breaker inputs (day start, blocks, cool-down, halt) do not feed the state features: neutral values
        acc = Account(acc.equity, acc.peak, acc.day, 0.0, True, acc.loss_streak, 0, True, acc.n_closed)
        _booked, acc = book_exit(exit_bar[k], side[k], entry[k], exit_px[k], size[k], abs(entry[k] - stop[k]), acc,
                                 ring_win, ring_eq, p)


def account_states(trades: Mapping[str, np.ndarray], index: Any, atr: np.ndarray, p: Params) -> np.ndarray:
    """``(n_trades, 6)`` :data:`ACCOUNT_STATE_FEATURES` at each trade's decision, from a fast run's trade dict
    (``FastRun.trades``: keys entry, exit, side, entry_px, exit_px, size, stop). Trades must come from one run
    starting flat with ``p.initial_equity`` (as :func:`backtest.engine.run_arrays` does)."""
    n = int(np.asarray(trades["entry"]).size)
    out = np.empty((n, N_ACC))
    if n == 0:
        return out
    hour, _ = decision_clock(index.as_unit("ns").asi8)
    vr = vol_regime_series(np.asarray(atr, dtype=np.float64), VOL_REGIME_BARS)
    g = lambda k, dt: np.ascontiguousarray(np.asarray(trades[k], dtype=dt))  # noqa: E731
    _replay_states(g("entry", np.int64), g("exit", np.int64), g("side", np.int64), g("entry_px", np.float64),
                   g("exit_px", np.float64), g("size", np.float64), g("stop", np.float64),
                   np.ascontiguousarray(hour), vr, p, out)
    return out


# ================================================================================================== fit + metrics
def fit_risk_model(X: np.ndarray, y: np.ndarray, mult_min: float, mult_max: float, params: Mapping[str, Any] | None,
                   seed: int, eval_set: tuple[np.ndarray, np.ndarray] | None = None) -> RiskModel:
    """LightGBM L2 regression on account-state rows, early-stopped on ``eval_set`` when given (deterministic)."""
    X = np.asarray(X, dtype=np.float64)
    if X.shape[1] != N_ACC:
        raise ValueError(f"X has {X.shape[1]} columns; expected {N_ACC} ({ACCOUNT_STATE_FEATURES})")
    base = dict(DEFAULT_PARAMS)
    base["min_data_in_leaf"] = int(min(base["min_data_in_leaf"], max(5, X.shape[0] // 10)))
    lp, rounds, es = lgb_params(base, params, seed, {"objective": "regression", "metric": "l2"})
    booster, info = train_booster(X, y, lp, rounds, es, ACCOUNT_STATE_FEATURES, eval_set)
    used = {k: v for k, v in lp.items() if k not in ("deterministic", "force_row_wise", "num_threads", "verbosity")
            and not k.endswith("seed")}
    used.update(num_boost_round=info["rounds"], early_stopping_rounds=es)
    return RiskModel(booster=booster, mult_min=float(mult_min), mult_max=float(mult_max), params=used,
                     seed=int(seed), info=info)


def risk_metrics(model: RiskModel, X: np.ndarray, y: np.ndarray, r: np.ndarray) -> dict[str, float]:
    """Fit to the labels (RMSE against the constant 1.0) and what the sizing would have done to these trades:
    ``sized_mean_r`` = sum(m * R) / sum(m) versus the unsized ``mean_r`` (higher = risk went where trades paid)."""
    if len(y) == 0:
        return {"n": 0}
    m = model.multiplier(X)
    r = np.asarray(r, dtype=np.float64)
    rmse = float(np.sqrt(np.mean((m - y) ** 2)))
    rmse1 = float(np.sqrt(np.mean((1.0 - y) ** 2)))
    corr = float(np.corrcoef(m, r)[0, 1]) if m.std() > 0 and r.std() > 0 else 0.0
    return {"n": int(len(y)), "rmse": rmse, "rmse_const1": rmse1, "corr_mult_r": corr,
            "mean_r": float(r.mean()), "sized_mean_r": float(np.sum(m * r) / np.sum(m)),
            "mult_mean": float(m.mean()), "mult_min": float(m.min()), "mult_max": float(m.max())}


# ================================================================================================== training
class _WithoutRisk:
    """A Predictor that hides the risk model of another (labels must not depend on a previous risk model)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.name = f"{getattr(inner, 'name', type(inner).__name__)} without risk model"

    @property
    def feature_names(self) -> list[str]:
        return list(self._inner.feature_names)

    def signal_proba(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        return self._inner.signal_proba(X)

    def sltp(self, X: np.ndarray) -> np.ndarray | None:  # noqa: N803
        return self._inner.sltp(X)

    @property
    def exit_model(self) -> Any:
        return self._inner.exit_model

    @property
    def risk_model(self) -> None:
        return None


@dataclass
class RiskRows:
    """The labelling backtest's trades with their account-state rows ``X``, realised ``r`` and targets ``y``."""

    X: np.ndarray
    y: np.ndarray
    r: np.ndarray
    trades: dict[str, np.ndarray]
    run_metrics: dict[str, Any]


def risk_rows(ds: Any, cfg: Config, predictor: Any, start: int, end: int, params: Params | None = None) -> RiskRows:
    """Run the labelling backtest on bars ``[start, end)`` with ``predictor`` (its risk model hidden) and label its
    trades (module docstring)."""
    from backtest.engine import prepare_arrays, run_arrays

    p = params if params is not None else make_params(cfg)
    p = replace_params(p, max_drawdown_halt_pct=100.0)  # see the module docstring, step 1
    arrays = prepare_arrays(ds.candles, ds.features, _WithoutRisk(predictor), cfg)
    run = run_arrays(arrays, p, start, end)
    X = account_states(run.trades, ds.candles.index, arrays.atr, p)
    r = np.asarray(run.trades["r"], dtype=np.float64)
    y = risk_labels(r, cfg.trading.risk_multiplier_min, cfg.trading.risk_multiplier_max)
    return RiskRows(X=X, y=y, r=r, trades=run.trades, run_metrics=run.metrics(arrays, cfg.profile.min_trades))


def train_risk(ds: Any, cfg: Config | None, models_dir: Path | str,
               params: Mapping[str, Any] | None = None) -> tuple[RiskModel, dict[str, Any]]:
    """Label the trades of a full fast backtest over the training window with the models in ``models_dir`` and fit
    the risk model; the chronologically last ``VAL_FRACTION`` of the trades early-stop it and score it.

    Requires the saved signal, position and SL/TP models (:class:`UserError` otherwise)."""
    from ml.models.bundle import load_bundle

    cfg = cfg or default_config()
    models_dir = Path(models_dir)
    require_models(models_dir, (*SIGNAL_KEYS, "position", "sl_tp"), "risk model")
    t0 = time.perf_counter()
    bundle = load_bundle(models_dir, ds.feature_names)
    train = np.asarray(ds.splits.train, dtype=np.int64)
    start, end = int(train[0]), int(train[-1]) + 1
    rows = risk_rows(ds, cfg, bundle, start, end)
    t_bt = time.perf_counter() - t0
    n = rows.y.size
    if n < MIN_TRADES:
        raise TooFewTrades(f"risk model: the labelling backtest over the training window made only {n} trades "
                        f"(need {MIN_TRADES}); lower trading.confidence_threshold or add history")
    cut = int(round(n * (1.0 - VAL_FRACTION)))
    tr, va = slice(0, cut), slice(cut, n)
    tmin, tmax = cfg.trading.risk_multiplier_min, cfg.trading.risk_multiplier_max
    model = fit_risk_model(rows.X[tr], rows.y[tr], tmin, tmax, params, int(cfg.tuning.seed),
                           eval_set=(rows.X[va], rows.y[va]))
    t_fit = time.perf_counter() - t0 - t_bt
    metrics = {
        "val": risk_metrics(model, rows.X[va], rows.y[va], rows.r[va]),
        "train": risk_metrics(model, rows.X[tr], rows.y[tr], rows.r[tr]),
        "label_rule": {"window": WINDOW, "r_cap": R_CAP, "k": K, "centred": True},
        "labelling_backtest": {k: rows.run_metrics.get(k) for k in ("n_trades", "return_pct", "max_drawdown_pct",
                                                                      "win_rate", "avg_r", "profit_factor")
                               if k in rows.run_metrics},
        "rounds": model.info.get("rounds"),
        "timings_s": {"backtest": round(t_bt, 3), "fit": round(t_fit, 3)},
    }
    idx = ds.candles.index
    model.info.update(train_range={"start": str(idx[start]), "end": str(idx[end - 1]), "n_trades": int(n),
                                   "n_fit": int(cut), "n_val": int(n - cut)},
                      data_hash=ds.data_hash(np.arange(start, end)))
    return model, metrics
