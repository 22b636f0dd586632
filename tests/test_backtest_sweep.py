"""``backtest/sweep.py``: the grid runs in threads that share the market arrays, with the same numbers as one thread
and as running each point on its own."""

from __future__ import annotations

import numpy as np
import pytest
from _candles import real_btc

from backtest.engine import MarketArrays, prepare_arrays, run_arrays
from backtest.policy import make_params, replace_params
from backtest.rules import RuleSignal, toy_exit_model, toy_risk_model
from backtest.stats import daily_returns, day_ends
from backtest.sweep import grid, run_sweep, score_params
from core.config import default_config
from market.features import build_features


@pytest.fixture(scope="module")
def arrays() -> MarketArrays:
    """Real BTC bars with the benchmark's predictor: rule signal, a 30-tree position model and risk model (both
    evaluated inside the kernel, so the threads really share trees)."""
    cfg = default_config()
    candles = real_btc(9000)
    feats = build_features(candles, cfg)
    pred = RuleSignal(list(feats.columns), sltp_rule=True, exit_model=toy_exit_model(feats, seed=1),
                      risk_model=toy_risk_model(seed=2))
    return prepare_arrays(candles, feats, pred, cfg)


def test_threads_give_the_numbers_of_one_thread_and_of_each_point_alone(arrays: MarketArrays) -> None:
    cfg = default_config()
    base = replace_params(make_params(cfg), max_drawdown_halt_pct=100.0, volume_min=1e-4, volume_step=1e-4)
    params = [replace_params(base, **{k: (list(v) if k == "sessions" else v) for k, v in pt.items()})
              for pt in grid(cfg)[::7]]
    start, end = 800, arrays.n
    ends = day_ends(arrays.day[start:end])
    one, d1 = score_params(arrays, params, start, end, 30, n_jobs=1, ends=ends)
    two, d2 = score_params(arrays, params, start, end, 30, n_jobs=2, ends=ends)
    assert one == two
    np.testing.assert_array_equal(d1, d2)
    trades = [m["trades"] for m in one]
    assert min(trades) > 50 and len(set(trades)) > 10  # real, varied runs, not empty ones
    for i in (0, len(params) // 2, len(params) - 1):  # each point alone, on fresh arrays: the same run
        alone = run_arrays(arrays.fork(), params[i], start, end, memo_paths=False)
        assert alone.metrics(arrays, 30) == one[i]
        np.testing.assert_array_equal(daily_returns(alone.equity, arrays.day[start:end], base.initial_equity, ends),
                                      d1[:, i])


def test_run_sweep_is_the_same_table_with_one_or_two_threads(arrays: MarketArrays) -> None:
    cfg = default_config()
    a = run_sweep(arrays, cfg, (6000, arrays.n), n_jobs=1)
    b = run_sweep(arrays, cfg, (6000, arrays.n), n_jobs=2)
    assert a.table.equals(b.table)
    np.testing.assert_array_equal(a.daily, b.daily)
    assert a.best == b.best and a.n_combos == len(grid(cfg))
