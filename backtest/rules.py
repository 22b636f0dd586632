"""A rule-based signal (NOT a model) that implements the Predictor protocol, plus toy tree models for tests.

Why: the backtester, its parity test, the CLI and the benchmark must work before the trained models exist (the
models issue). Nothing here pretends to be a model: :class:`RuleSignal` says "rule-based" in its name and in every
report, and the toy trees are trained on seeded synthetic targets only so that tests and the benchmark exercise the
compiled-tree code paths (position model and risk model inside the kernel) with real LightGBM boosters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from backtest.policy import ACCOUNT_STATE_FEATURES, POSITION_STATE_FEATURES
from backtest.predictor import CompiledModels
from backtest.trees import CompiledTrees, compile_booster


class RuleSignal(CompiledModels):
    """Rule-based momentum signal (not a model).

    ``z = ret_{h} / (rv_16 * sqrt(h))`` is the last ``h``-bar log return (h in 1, 4, 16, 64) in units of the recent
    per-bar volatility scaled to ``h`` bars. Shaped like a three-class model's output (long / short / no trade):
    ``p_long = 1 / (1 + exp(-gain * (z - offset)))``, ``p_short = 1 / (1 + exp(-gain * (-z - offset)))``; both are
    0.27 at ``z = 0`` (with the defaults), so a threshold of 0.5 trades only when ``|z| > offset``. Row-wise, so one
    row or all rows give the same numbers (step / fast parity). ``gain < 0`` turns it into a mean-reversion rule.

    With ``sltp_rule=True`` it also provides rule-based stop/target distances
    ``sl_atr = clip(1 + 0.5 * vol_ratio, 0.75, 3)``, ``tp_atr = 1.5 * sl_atr`` (wider stops when short-term
    volatility runs above long-term), so that the SL/TP code path can be tested before the SL/TP models exist.
    ``exit_model`` / ``risk_model`` are passed through unchanged (e.g. the toy models below in tests).
    """

    def __init__(self, feature_names: Sequence[str], *, horizon: int = 16, gain: float = 1.0, offset: float = 1.0,
                 sltp_rule: bool = False,
                 exit_model: tuple[CompiledTrees, np.ndarray] | None = None,
                 risk_model: CompiledTrees | None = None) -> None:
        self._names = list(feature_names)
        self.horizon = int(horizon)
        self.gain = float(gain)
        self.offset = float(offset)
        self.sltp_rule = sltp_rule
        self._exit_model = exit_model
        self._risk_model = risk_model
        need = [f"ret_{horizon}", "rv_16"] + (["vol_ratio"] if sltp_rule else [])
        missing = [c for c in need if c not in self._names]
        if missing:
            raise ValueError(f"RuleSignal needs feature columns {missing}")
        self._i_ret = self._names.index(f"ret_{horizon}")
        self._i_rv = self._names.index("rv_16")
        self._i_vr = self._names.index("vol_ratio") if sltp_rule else -1
        self.name = f"rule-based momentum z(ret_{horizon}) (not a model)"

    @property
    def feature_names(self) -> list[str]:
        return self._names

    def signal_proba(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        ret = X[:, self._i_ret].astype(np.float64)
        rv = X[:, self._i_rv].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = ret / (rv * math.sqrt(self.horizon))
        pl = 1.0 / (1.0 + np.exp(-self.gain * (z - self.offset)))
        ps = 1.0 / (1.0 + np.exp(-self.gain * (-z - self.offset)))
        bad = ~np.isfinite(z)
        pl[bad] = np.nan
        ps[bad] = np.nan
        return np.column_stack([pl, ps])

    def sltp(self, X: np.ndarray) -> np.ndarray | None:
        if not self.sltp_rule:
            return None
        vr = np.asarray(X)[:, self._i_vr].astype(np.float64)
        sl = np.clip(1.0 + 0.5 * vr, 0.75, 3.0)
        return np.column_stack([sl, 1.5 * sl])


# ------------------------------------------------------------------------------------- toy models (tests, bench)
TOY_EXIT_MARKET_COLS = ("rsi_14", "vol_ratio", "ret_4", "range_pos_20")


def toy_exit_model(features: pd.DataFrame, seed: int = 0, market_cols: Sequence[str] = TOY_EXIT_MARKET_COLS,
                   n_rows: int = 4000, n_trees: int = 30) -> tuple[CompiledTrees, np.ndarray]:
    """A small real LightGBM exit model on SYNTHETIC, seeded targets (not a trading model).

    Rows: random position states (side, age 1-40, unrealised/stop/target distances in ATR) next to the market
    features of random real bars; target: "exit" when the unrealised result exceeds ~0.7 ATR, when the position is
    old, or at random (10 %). It fires often enough that model exits occur in every backtest that uses it."""
    import lightgbm as lgb

    rng = np.random.default_rng(seed)
    cols = [features.columns.get_loc(c) for c in market_cols]
    mkt = features.iloc[:, cols].to_numpy(np.float64)
    mkt = mkt[np.isfinite(mkt).all(axis=1)]
    mkt = mkt[rng.integers(0, len(mkt), n_rows)]
    side = rng.choice([-1.0, 1.0], n_rows)
    age = rng.integers(1, 41, n_rows).astype(np.float64)
    unreal = rng.normal(0.0, 1.2, n_rows)
    dsl = unreal + rng.uniform(0.5, 2.5, n_rows)
    dtp = rng.uniform(0.5, 3.5, n_rows) - unreal
    X = np.column_stack([side, age, unreal, dsl, dtp, mkt])
    y = ((unreal + 0.3 * (mkt[:, 0] - 50.0) / 20.0 > 0.7) | (age > 24) | (rng.random(n_rows) < 0.1)).astype(float)
    params = {"objective": "binary", "num_leaves": 15, "learning_rate": 0.1, "min_data_in_leaf": 30, "verbose": -1,
              "seed": seed, "num_threads": 1, "deterministic": True}
    names = [*POSITION_STATE_FEATURES, *market_cols]
    booster = lgb.train(params, lgb.Dataset(X, y, feature_name=names), num_boost_round=n_trees)
    return compile_booster(booster), np.asarray(cols, dtype=np.int64)


def toy_risk_model(seed: int = 0, n_rows: int = 3000, n_trees: int = 30) -> CompiledTrees:
    """A small real LightGBM risk model on SYNTHETIC, seeded targets (not a trading model): the multiplier falls
    with drawdown and losing streak and rises with the recent win rate."""
    import lightgbm as lgb

    rng = np.random.default_rng(seed)
    dd = rng.uniform(0.0, 20.0, n_rows)
    wr = rng.uniform(0.0, 1.0, n_rows)
    streak = rng.integers(0, 8, n_rows).astype(np.float64)
    slope = rng.normal(0.0, 0.05, n_rows)
    vreg = rng.uniform(0.5, 2.0, n_rows)
    sess = rng.integers(0, 8, n_rows).astype(np.float64)
    X = np.column_stack([dd, wr, streak, slope, vreg, sess])
    y = 1.2 - 0.04 * dd + 0.6 * (wr - 0.5) - 0.08 * streak - 0.2 * (vreg - 1.0) + rng.normal(0, 0.1, n_rows)
    params = {"objective": "regression", "num_leaves": 15, "learning_rate": 0.1, "min_data_in_leaf": 30,
              "verbose": -1, "seed": seed, "num_threads": 1, "deterministic": True}
    booster = lgb.train(params, lgb.Dataset(X, y, feature_name=list(ACCOUNT_STATE_FEATURES)), num_boost_round=n_trees)
    return compile_booster(booster)
