"""Step mode (the live Trader, bar by bar, features from a bounded window) == fast mode (compiled kernel).

This is the proof that the fast backtest is config-faithful: on real BTC candles, with the position (exit) model
and the risk model active as real LightGBM trees, SL/TP distances per bar, and breakers that actually trip (daily
loss, losing streak and the drawdown halt), both modes must produce the same trades (entry/exit bars, sides, sizes,
prices) and the same equity curve.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from _candles import real_btc
from _helpers import rule_models_on_real_btc, tripping_params

from backtest.engine import prepare_arrays, run_arrays, run_fast, run_replay, run_step
from backtest.policy import TRIP_REASONS, make_params, replace_params
from backtest.rules import RuleSignal, toy_exit_model, toy_risk_model
from market.features import build_features

START, END = 1000, 6000  # 5,000 bars after the feature warm-up


@pytest.fixture(scope="module")
def setup():  # noqa: ANN201
    cfg, candles, feats, pred = rule_models_on_real_btc(END)
    # breakers tuned so that all three trip inside the window, the 25 % drawdown halt late (bar ~5,600)
    p = tripping_params(cfg, max_drawdown_halt_pct=25.0)
    return cfg, candles, feats, pred, p


def _assert_same(fast, other, *, exact: bool) -> None:  # noqa: ANN001
    ft, ot = fast.trades, other.trades
    assert len(ft) == len(ot)
    for col in ("entry_bar", "exit_bar", "side", "exit_reason"):
        assert ft[col].tolist() == ot[col].tolist(), col
    for col in ("size", "entry_price", "exit_price", "stop", "target", "pnl", "risk_mult"):
        if exact:
            np.testing.assert_array_equal(ft[col].to_numpy(), ot[col].to_numpy(), err_msg=col)
        else:
            np.testing.assert_allclose(ft[col].to_numpy(), ot[col].to_numpy(), rtol=1e-9, atol=1e-9, err_msg=col)
    np.testing.assert_allclose(fast.equity.to_numpy(), other.equity.to_numpy(), rtol=1e-6, atol=0)
    assert fast.trips == other.trips
    assert fast.skipped_size == other.skipped_size


@pytest.mark.slow
def test_step_equals_fast_on_real_data_with_models_and_breakers(setup) -> None:  # noqa: ANN001
    cfg, candles, feats, pred, p = setup
    fast = run_fast(candles, feats, pred, cfg, START, END, params=p)
    t0 = time.perf_counter()
    step = run_step(candles, pred, cfg, START, END, params=p)
    dt = time.perf_counter() - t0
    print(f"step mode: {END - START} bars in {dt:.1f} s = {(END - START) / dt:.0f} bars/s")

    # the scenario really exercises what it claims to
    reasons = Counter(fast.trades["exit_reason"])
    trips = Counter(t["reason"] for t in fast.trips)
    assert len(fast.trades) >= 100
    assert reasons["model"] > 0 and reasons["stop"] > 0 and reasons["target"] > 0
    assert set(trips) == set(TRIP_REASONS.values())
    assert fast.trades["risk_mult"].nunique() > 10  # the risk model varies the size
    halt_bar = next(t["bar"] for t in fast.trips if t["reason"] == "drawdown_halt")
    assert START + 3000 < halt_bar < END - 100

    _assert_same(fast, step, exact=False)
    assert fast.metrics == pytest.approx(step.metrics, rel=1e-9)


def test_kernel_equals_trader_on_all_bars(setup) -> None:  # noqa: ANN001
    """The rules alone (precomputed inputs, no feature recomputation) on the whole real file: exact equality."""
    cfg = setup[0]
    candles = real_btc()
    feats = build_features(candles, cfg)
    pred = RuleSignal(list(feats.columns), sltp_rule=True, exit_model=toy_exit_model(feats, seed=3),
                      risk_model=toy_risk_model(seed=4))
    A = prepare_arrays(candles, feats, pred, cfg)
    p = replace_params(make_params(cfg), confidence_threshold=0.6, daily_loss_limit_pct=2.0,
                       max_consecutive_losses=4, cooldown_bars=12, max_drawdown_halt_pct=60.0)
    fast = run_arrays(A, p, 800, A.n)
    ref, _ = run_replay(A, p, 800, A.n)
    assert fast.n_trades > 500
    for k, v in fast.trades.items():
        np.testing.assert_array_equal(v, ref.trades[k], err_msg=k)
    np.testing.assert_array_equal(fast.equity, ref.equity)
    np.testing.assert_array_equal(fast.trip_code, ref.trip_code)
