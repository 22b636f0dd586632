"""One focused test per trading rule (backtest/policy.py R1-R17), each run through BOTH drivers.

Every scenario runs the compiled kernel (``run_arrays``) and the live Trader (``run_replay``) on the same hand-made
bars and requires identical trades, equity and breaker trips before checking the rule itself.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from backtest.engine import MarketArrays, prepare_arrays, run_arrays, run_replay
from backtest.live import Trader
from backtest.policy import (
    ACCOUNT_STATE_FEATURES,
    EXIT_REASONS,
    POSITION_STATE_FEATURES,
    TRIP_REASONS,
    State,
    decision_clock,
    make_params,
    position_size,
    replace_params,
    session_allowed,
    session_code,
    sessions_mask,
)
from backtest.trees import OBJ_IDENTITY, OBJ_SIGMOID, CompiledTrees, build_trees, empty_trees
from core.config import default_config

T0 = pd.Timestamp("2024-01-01 00:00", tz="UTC")
QUIET = (100.0, 101.0, 99.0, 100.0)  # never reaches a 10-point stop or a 20-point target from 100

# zero costs, 1-point price unit, ATR 10 -> stop 10, target 20, size = 1% of 10,000 / 10 = 10 lots
P0 = replace_params(
    make_params(default_config()), commission_per_lot=0.0, slippage_points=0.0, point=1.0, contract_size=1.0,
    volume_min=0.01, volume_step=0.01, volume_max=100.0, confidence_threshold=0.6, fixed_sl_atr=1.0,
    fixed_tp_atr=2.0, sl_multiplier=1.0, tp_multiplier=1.0, max_holding_bars=1000, exit_threshold=0.6,
    initial_equity=10_000.0, risk_percent=1.0, daily_loss_limit_pct=100.0, max_consecutive_losses=1000,
    cooldown_bars=0, max_drawdown_halt_pct=100.0, max_spread_points=1e9, session_mask=7,
    risk_multiplier_min=0.25, risk_multiplier_max=1.5,
)


def _arr(x: object, n: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    return np.full(n, float(a)) if a.ndim == 0 else a.copy()


def market(rows: list[tuple[float, float, float, float]], *, p_long: object = 0.0, p_short: object = 0.0,
           atr: object = 10.0, spread: object = 0.0, sl_atr: object | None = None, tp_atr: object | None = None,
           exit_model: CompiledTrees | None = None, exit_X: np.ndarray | None = None,
           risk_model: CompiledTrees | None = None, vol_regime: object = 1.0,
           start: pd.Timestamp = T0) -> MarketArrays:
    """Hand-made MarketArrays (bar open times every 15 min from ``start``)."""
    n = len(rows)
    ohlc = np.asarray(rows, dtype=np.float64)
    idx = pd.date_range(start, periods=n, freq="15min", tz="UTC")
    hour, day = decision_clock(idx.as_unit("ns").asi8)
    use_sltp = sl_atr is not None
    return MarketArrays(
        index=idx, open=ohlc[:, 0].copy(), high=ohlc[:, 1].copy(), low=ohlc[:, 2].copy(), close=ohlc[:, 3].copy(),
        spread=_arr(spread, n), hour=hour, day=day, atr=_arr(atr, n), p_long=_arr(p_long, n),
        p_short=_arr(p_short, n), sl_atr=_arr(sl_atr if use_sltp else np.nan, n),
        tp_atr=_arr(tp_atr if use_sltp else np.nan, n), use_sltp=use_sltp,
        exit_X=np.zeros((n, 0)) if exit_X is None else np.ascontiguousarray(exit_X, dtype=np.float64),
        exit_trees=exit_model if exit_model is not None else empty_trees(), use_exit=exit_model is not None,
        vol_regime=_arr(vol_regime, n), risk_trees=risk_model if risk_model is not None else empty_trees(),
        use_risk=risk_model is not None,
    )


def both(A: MarketArrays, p=P0, start: int = 0, end: int | None = None):  # noqa: ANN001, ANN201
    """Run kernel and Trader; assert they agree exactly; return the kernel's FastRun."""
    fast = run_arrays(A, p, start, end, memo_paths=False)
    ref, _ = run_replay(A, p, start, end)
    for k, v in fast.trades.items():
        np.testing.assert_array_equal(v, ref.trades[k], err_msg=k)
    np.testing.assert_array_equal(fast.equity, ref.equity)
    np.testing.assert_array_equal(fast.trip_bar, ref.trip_bar)
    np.testing.assert_array_equal(fast.trip_code, ref.trip_code)
    assert fast.skipped_size == ref.skipped_size
    again = run_arrays(A, p, start, end)  # memoised paths give the same answer
    np.testing.assert_array_equal(again.equity, fast.equity)
    return fast


def reasons(run) -> list[str]:  # noqa: ANN001
    return [EXIT_REASONS[int(c)] for c in run.trades["reason"]]


def one_signal(n: int, at: int = 0, side: str = "long") -> np.ndarray:
    p = np.zeros(n)
    p[at] = 0.9
    return p if side == "long" else p


def leaf(value: float, objective: int = OBJ_SIGMOID, num_features: int = 5) -> CompiledTrees:
    """A one-leaf model: constant raw score."""
    return build_trees([{"leaf_value": value}], objective, num_features=num_features)


def stump(feature: int, threshold: float, left: float, right: float, objective: int = OBJ_SIGMOID,
          num_features: int = 5) -> CompiledTrees:
    """One split ``x[feature] <= threshold`` -> left leaf else right leaf."""
    tree = {"split_feature": feature, "threshold": threshold, "left_child": {"leaf_value": left},
            "right_child": {"leaf_value": right}}
    return build_trees([tree], objective, num_features=num_features)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# ------------------------------------------------------------------------------------------------ R1 clock
def test_decision_clock_uses_bar_close_and_sessions_bitmask() -> None:
    idx = pd.DatetimeIndex(["2024-01-01 06:45", "2024-01-01 23:45"], tz="UTC")
    hour, day = decision_clock(idx.as_unit("ns").asi8)
    assert hour.tolist() == [7, 0]  # decided at 07:00 and 00:00 (next day)
    assert day[1] == day[0] + 1
    assert session_code(7) == 1 | 2 and session_code(14) == 2 | 4 and session_code(22) == 0
    assert session_allowed(7, sessions_mask(["london"])) and not session_allowed(3, sessions_mask(["london"]))


# ------------------------------------------------------------------------------------------------ R5 fill
@pytest.mark.parametrize("side", ["long", "short"])
def test_fill_at_next_open_plus_half_spread_and_slippage(side: str) -> None:
    n = 4
    sig = one_signal(n)
    p = replace_params(P0, slippage_points=2.0, point=0.5, commission_per_lot=1.0)
    spread = [0.0, 4.0, 0.0, 6.0]  # the FILL bar's spread counts (bar 1), the exit bar's for the exit (bar 3)
    A = market([QUIET] * n, p_long=sig if side == "long" else 0.0, p_short=sig if side == "short" else 0.0,
               spread=spread)
    run = both(A, p)
    s = 1 if side == "long" else -1
    assert run.trades["entry"].tolist() == [1] and run.trades["side"].tolist() == [s]
    cost_in = (4.0 / 2 + 2.0) * 0.5
    assert run.trades["entry_px"][0] == 100.0 + s * cost_in
    # the last bar of the window closes the position at its close, paying its own half spread + slippage (R13)
    cost_out = (6.0 / 2 + 2.0) * 0.5
    assert reasons(run) == ["end"] and run.trades["exit"][0] == 3
    assert run.trades["exit_px"][0] == 100.0 - s * cost_out
    size = run.trades["size"][0]
    assert size == pytest.approx(math.floor(100.0 / (10.0 + 2.0) / 0.01 + 1e-9) * 0.01)  # commission in the risk
    assert run.trades["pnl"][0] == pytest.approx(-(cost_in + cost_out) * size - 2 * 1.0 * size)


# ------------------------------------------------------------------------------------------------ R10 stops
def test_stop_is_live_on_the_fill_bar() -> None:
    A = market([QUIET, (100.0, 101.0, 89.0, 95.0), QUIET], p_long=one_signal(3))
    run = both(A)
    assert run.trades["entry"].tolist() == [1] and run.trades["exit"].tolist() == [1]
    assert reasons(run) == ["stop"] and run.trades["exit_px"][0] == 90.0
    assert run.trades["r"][0] == pytest.approx(-1.0)


def test_target_is_live_on_the_fill_bar_short() -> None:
    A = market([QUIET, (100.0, 101.0, 79.0, 85.0), QUIET], p_short=one_signal(3))
    run = both(A)
    assert reasons(run) == ["target"] and run.trades["exit_px"][0] == 80.0 and run.trades["exit"][0] == 1


@pytest.mark.parametrize(("bar2", "reason", "px"), [((85.0, 86.0, 84.0, 85.0), "stop", 85.0),
                                                    ((125.0, 126.0, 124.0, 125.0), "target", 125.0)])
def test_gap_through_stop_or_target_fills_at_the_open(bar2: tuple[float, ...], reason: str, px: float) -> None:
    A = market([QUIET, QUIET, bar2, QUIET], p_long=one_signal(4))
    run = both(A)
    assert reasons(run) == [reason] and run.trades["exit"][0] == 2 and run.trades["exit_px"][0] == px


def test_stop_counts_first_when_one_bar_touches_both() -> None:
    A = market([QUIET, QUIET, (100.0, 125.0, 85.0, 110.0), QUIET], p_long=one_signal(4))
    run = both(A)
    assert reasons(run) == ["stop"] and run.trades["exit_px"][0] == 90.0


# ------------------------------------------------------------------------------------------------ R14 re-entry
def test_decision_on_the_exit_bar_may_reenter_and_one_position_at_a_time() -> None:
    n = 6
    p_long = np.full(n, 0.9)  # a signal on every bar
    rows = [QUIET, (100.0, 101.0, 89.0, 95.0), QUIET, QUIET, QUIET, QUIET]
    run = both(market(rows, p_long=p_long))
    # first trade stops on its fill bar 1; the close of bar 1 decides again -> fill at bar 2; then it stays open
    assert run.trades["entry"].tolist() == [1, 2] and run.trades["exit"].tolist() == [1, 5]
    assert reasons(run) == ["stop", "end"]


# ------------------------------------------------------------------------------------------------ R12 exits
def test_max_holding_exits_at_the_next_open() -> None:
    rows = [QUIET, QUIET, QUIET, QUIET, (101.0, 102.0, 100.0, 101.0), QUIET]
    run = both(market(rows, p_long=one_signal(6)), replace_params(P0, max_holding_bars=3))
    # filled at bar 1; held 3 bars at the close of bar 3 -> exit at the open of bar 4
    assert reasons(run) == ["time"] and run.trades["exit"][0] == 4 and run.trades["exit_px"][0] == 101.0


def test_position_model_exit_on_its_state_features_at_the_next_open() -> None:
    # exit probability 0.9 when unrealised_atr (state feature 2) > 0.5, else 0.1
    model = stump(2, 0.5, logit(0.1), logit(0.9))
    rows = [QUIET, (100.0, 104.0, 99.0, 103.0), (103.0, 107.0, 102.0, 106.0), (106.5, 107.0, 105.0, 106.0), QUIET]
    run = both(market(rows, p_long=one_signal(5), exit_model=model))
    # close 103 -> +0.3 ATR: hold; close 106 -> +0.6 ATR: exit at the open of bar 3
    assert reasons(run) == ["model"] and run.trades["exit"][0] == 3 and run.trades["exit_px"][0] == 106.5
    # below the threshold the model never exits
    run2 = both(market(rows, p_long=one_signal(5), exit_model=leaf(logit(0.5))))
    assert reasons(run2) == ["end"]


def test_position_model_sees_its_market_columns_after_the_state() -> None:
    model = stump(5, 0.0, logit(0.1), logit(0.9), num_features=6)  # first market column > 0 -> exit
    X = np.array([[0.0], [0.0], [1.0], [0.0], [0.0]])
    run = both(market([QUIET] * 5, p_long=one_signal(5), exit_model=model, exit_X=X))
    assert reasons(run) == ["model"] and run.trades["exit"][0] == 3


# ------------------------------------------------------------------------------------------------ R6 distances
def test_sltp_model_distances_times_multipliers() -> None:
    A = market([QUIET] * 4, p_long=one_signal(4), sl_atr=2.0, tp_atr=3.0)
    run = both(A, replace_params(P0, sl_multiplier=1.5, tp_multiplier=0.5))
    assert run.trades["stop"][0] == 100.0 - 2.0 * 1.5 * 10.0
    assert run.trades["target"][0] == 100.0 + 3.0 * 0.5 * 10.0
    assert run.trades["size"][0] == pytest.approx(100.0 / 30.0 // 0.01 * 0.01)


def test_bad_atr_means_no_trade() -> None:
    run = both(market([QUIET] * 4, p_long=0.9, atr=np.nan))
    assert run.n_trades == 0


# ------------------------------------------------------------------------------------------------ R7 size
def test_size_floor_clamp_and_below_minimum() -> None:
    p = P0
    assert position_size(10_000.0, 12.0, 1.0, p) == pytest.approx(8.33)  # 8.333.. floored to the 0.01 step
    assert position_size(10_000.0, 10.0, 1.0, replace_params(p, volume_max=5.0)) == 5.0  # clamped
    assert position_size(10_000.0, 10.0, 1.0, replace_params(p, volume_step=0.1)) == pytest.approx(10.0)
    assert position_size(0.5, 10.0, 1.0, p) == 0.0  # 0.0005 lots < volume_min
    assert position_size(-5.0, 10.0, 1.0, p) == 0.0


def test_size_below_minimum_is_no_trade_and_counted() -> None:
    run = both(market([QUIET] * 5, p_long=0.9), replace_params(P0, initial_equity=0.5))
    assert run.n_trades == 0 and run.skipped_size == 4  # decisions at bars 0-3 (none on the last bar)


# ------------------------------------------------------------------------------------------------ R8 risk model
@pytest.mark.parametrize(("raw", "mult"), [(5.0, 1.5), (0.0, 0.25), (0.8, 0.8)])
def test_risk_model_multiplier_is_clamped(raw: float, mult: float) -> None:
    A = market([QUIET] * 3, p_long=one_signal(3), risk_model=leaf(raw, OBJ_IDENTITY, num_features=6))
    run = both(A)
    assert run.trades["mult"][0] == mult
    assert run.trades["size"][0] == pytest.approx(math.floor(10.0 * mult / 0.01 + 1e-9) * 0.01)


def test_account_state_features_reach_the_risk_model() -> None:
    # multiplier 1.5 while the losing streak (account feature 2) is 0, else 0.25
    model = stump(2, 0.5, 1.5, 0.25, OBJ_IDENTITY, num_features=6)
    rows = [QUIET, (100.0, 101.0, 89.0, 95.0), QUIET, QUIET]
    run = both(market(rows, p_long=np.array([0.9, 0.9, 0.0, 0.0]), risk_model=model))
    assert run.trades["mult"].tolist() == [1.5, 0.25]


# ------------------------------------------------------------------------------------------------ R4 filters
def test_session_and_spread_filters() -> None:
    n = 40  # bars from 00:00: decision hours 0..10
    run = both(market([QUIET] * n, p_long=0.9), replace_params(P0, session_mask=sessions_mask(["london"]),
                                                                max_holding_bars=1))
    first_decision = int(run.trades["entry"][0]) - 1
    assert decision_clock(market([QUIET] * n).index.as_unit("ns").asi8)[0][first_decision] == 7
    spread = np.full(n, 10.0)
    run2 = both(market([QUIET] * n, p_long=0.9, spread=spread), replace_params(P0, max_spread_points=9.0))
    assert run2.n_trades == 0


def test_signal_side_larger_wins_and_threshold() -> None:
    rows = [QUIET] * 3
    assert both(market(rows, p_long=[0.7, 0, 0], p_short=[0.8, 0, 0])).trades["side"].tolist() == [-1]
    assert both(market(rows, p_long=[0.7, 0, 0], p_short=[0.7, 0, 0])).trades["side"].tolist() == [1]
    assert both(market(rows, p_long=[0.59, 0, 0], p_short=[0.2, 0, 0])).n_trades == 0
    assert both(market(rows, p_long=[np.nan, 0, 0], p_short=[0.9, 0, 0])).n_trades == 0


# ------------------------------------------------------------------------------------------------ breakers
STOPPED = (100.0, 101.0, 85.0, 95.0)  # every position stops out on its fill bar (-1 % of equity each)


def test_daily_loss_breaker_blocks_until_the_next_utc_day() -> None:
    n = 100
    run = both(market([STOPPED] * n, p_long=0.9), replace_params(P0, daily_loss_limit_pct=1.0))
    names = [TRIP_REASONS[int(c)] for c in run.trip_code]
    # first loss = exactly 1 % -> trips at bar 1; decisions resume on the next UTC day: bar 95 decides at 00:00
    assert names[0] == "daily_loss" and run.trip_bar[0] == 1
    assert run.trades["entry"].tolist()[:2] == [1, 96]
    assert run.trip_bar.tolist() == [1, 96]


def test_loss_streak_cooldown() -> None:
    n = 20
    run = both(market([STOPPED] * n, p_long=0.9),
               replace_params(P0, max_consecutive_losses=2, cooldown_bars=5))
    # losses at bars 1, 2 -> trip at 2, decisions at bars 2..6 blocked -> next fill at 8
    assert run.trades["entry"].tolist()[:4] == [1, 2, 8, 9]
    assert [TRIP_REASONS[int(c)] for c in run.trip_code][:2] == ["loss_streak", "loss_streak"]
    assert run.trip_bar.tolist()[:2] == [2, 9]
    # cooldown 0: the trip is recorded but nothing is blocked
    run0 = both(market([STOPPED] * 6, p_long=0.9), replace_params(P0, max_consecutive_losses=2, cooldown_bars=0))
    assert run0.trades["entry"].tolist() == [1, 2, 3, 4, 5] and run0.trip_bar.tolist() == [2, 4]


def test_loss_streak_resets_on_a_win() -> None:
    WIN = (100.0, 125.0, 99.0, 120.0)
    rows = [STOPPED, STOPPED, WIN, STOPPED, STOPPED, QUIET]
    run = both(market(rows, p_long=0.9), replace_params(P0, max_consecutive_losses=3, cooldown_bars=50))
    assert run.trip_bar.size == 0 and run.n_trades == 5


def test_drawdown_halt_for_the_rest_of_the_run() -> None:
    n = 30
    run = both(market([STOPPED] * n, p_long=0.9), replace_params(P0, max_drawdown_halt_pct=2.5))
    assert run.n_trades == 3  # -1 %, -1 %, -1 % -> 2.97 % below the peak
    assert [TRIP_REASONS[int(c)] for c in run.trip_code] == ["drawdown_halt"] and run.trip_bar[0] == 3
    assert np.all(run.equity[3:] == run.equity[3])


# ------------------------------------------------------------------------------------------------ state
def test_state_json_round_trip_mid_position_continues_identically() -> None:
    from _candles import real_btc

    from backtest.rules import RuleSignal, toy_exit_model, toy_risk_model
    from market.features import build_features

    cfg = default_config()
    candles = real_btc(4000)
    feats = build_features(candles, cfg)
    pred = RuleSignal(list(feats.columns), sltp_rule=True, exit_model=toy_exit_model(feats, seed=5),
                      risk_model=toy_risk_model(seed=6))
    A = prepare_arrays(candles, feats, pred, cfg)
    p = replace_params(make_params(cfg), daily_loss_limit_pct=2.0, max_consecutive_losses=3, cooldown_bars=4)
    full, _ = run_replay(A, p, 800, 4000)
    assert full.n_trades > 20 and full.trip_bar.size > 0
    # cut in the middle of an open position (entered before the cut, exiting after it)
    k = next(i for i in range(full.n_trades) if full.trades["exit"][i] - full.trades["entry"][i] >= 3
             and full.trades["entry"][i] > 2000)
    cut = int(full.trades["entry"][k]) + 1
    first, tr = run_replay(A, p, 800, cut, close_at_end=False)  # stop like a live bot, mid-position
    assert tr.state.side != 0
    text = json.dumps(tr.state.to_dict())
    restored = State.from_dict(json.loads(text))
    assert restored == tr.state
    em = (A.exit_trees, np.arange(A.exit_X.shape[1]))
    tr2 = Trader(None, None, params=p, state=restored, exit_model=em, risk_model=A.risk_trees)
    second, _ = run_replay(A, p, cut, 4000, trader=tr2)
    np.testing.assert_array_equal(np.concatenate([first.equity, second.equity]), full.equity)
    for key in full.trades:
        np.testing.assert_array_equal(second.trades[key], full.trades[key][full.trades["exit"] >= cut], err_msg=key)
    fast = run_arrays(A, p, 800, 4000)
    np.testing.assert_array_equal(fast.equity, full.equity)


def test_state_from_dict_rejects_unknown_schema() -> None:
    d = State.initial(1000.0).to_dict()
    d["surprise"] = 1
    with pytest.raises(ValueError):
        State.from_dict(d)


def test_state_feature_names() -> None:
    assert POSITION_STATE_FEATURES == ["side", "age_bars", "unrealised_atr", "dist_sl_atr", "dist_tp_atr"]
    assert ACCOUNT_STATE_FEATURES == ["dd_from_peak_pct", "recent_win_rate", "losing_streak", "equity_slope",
                                      "vol_regime", "session_code"]
