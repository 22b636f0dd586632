"""The backtester started from a saved State (what the walk-forward replay carries from week to week).

On real BTC candles with a rule signal, a position (exit) model and a risk model as real trees, and breakers tuned
to trip: the kernel run in weekly pieces, each starting from the state the previous one ended with, equals one
continuous run (same trades, same equity, bit for bit), open positions and pending orders crossing the cuts
included; and each piece equals the live Trader continued from the same state.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _helpers import rule_models_on_real_btc, tripping_params

from backtest.engine import prepare_arrays, run_arrays, run_replay
from backtest.policy import State

START, END = 1000, 7000
WEEK_BARS = 672


@pytest.fixture(scope="module")
def setup():  # noqa: ANN201
    cfg, candles, feats, pred = rule_models_on_real_btc(END)
    arrays = prepare_arrays(candles, feats, pred, cfg)
    p = tripping_params(cfg, max_drawdown_halt_pct=40.0)
    return arrays, p


def _cuts(arrays, p) -> list[int]:  # noqa: ANN001
    """Weekly cuts plus cuts placed inside open positions and right after an entry decision (pending order)."""
    full = run_arrays(arrays, p, START, END)
    e, x = full.trades["entry"], full.trades["exit"]
    inside = [int(a) + 1 for a, b in zip(e, x, strict=True) if b > a + 2][3:40:9]
    pending = [int(a) for a in e[5:40:11]]
    cuts = sorted({*range(START, END, WEEK_BARS), *inside, *pending, END})
    return [c for i, c in enumerate(cuts) if i == 0 or c - cuts[i - 1] >= 2]


def _material(st: State) -> dict:
    """The fields that matter for the future (the Trader leaves stale position fields around when flat)."""
    d = st.to_dict()
    if d["side"] == 0:
        for k in ("size", "entry_price", "stop", "target", "sl_dist", "entry_bar", "entry_time_ns", "risk_mult",
                  "pending_exit"):
            d.pop(k)
    if d["pending_side"] == 0:
        for k in ("pending_size", "pending_sl_dist", "pending_tp_dist", "pending_risk_mult"):
            d.pop(k)
    return d


def test_weekly_pieces_from_saved_states_equal_one_continuous_run(setup) -> None:  # noqa: ANN001
    arrays, p = setup
    full = run_arrays(arrays, p, START, END)
    cuts = _cuts(arrays, p)
    state, eq, trades, crossing = None, [], [], 0
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        piece = run_arrays(arrays, p, a, b, state=state, close_at_end=b == END)
        state = State.from_json(piece.final_state.to_json())  # through JSON, as the replay saves it
        crossing += state.side != 0 or state.pending_side != 0
        eq.append(piece.equity)
        trades.append(piece.trades)
    assert full.n_trades > 100 and crossing >= 6, (full.n_trades, crossing)  # the scenario exercises the carry
    np.testing.assert_array_equal(np.concatenate(eq), full.equity)
    for k in full.trades:
        np.testing.assert_array_equal(np.concatenate([t[k] for t in trades]), full.trades[k], err_msg=k)
    assert state.side == 0 and state.equity == pytest.approx(full.equity[-1])
    print(f"{len(cuts) - 1} pieces, {full.n_trades} trades, {crossing} cuts inside a position or a pending order")


def test_kernel_from_state_equals_trader_from_state(setup) -> None:  # noqa: ANN001
    arrays, p = setup
    cuts = _cuts(arrays, p)
    state, trader = None, None
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        fast = run_arrays(arrays, p, a, b, state=state, close_at_end=False)
        ref, trader = run_replay(arrays, p, a, b, trader=trader, close_at_end=False)
        np.testing.assert_array_equal(fast.equity, ref.equity)
        for k in fast.trades:
            np.testing.assert_array_equal(fast.trades[k], ref.trades[k], err_msg=k)
        assert _material(fast.final_state) == _material(trader.state)
        state = fast.final_state


def test_state_with_a_position_after_the_window_start_is_refused(setup) -> None:  # noqa: ANN001
    arrays, p = setup
    st = State.initial(10_000.0)
    st.side, st.entry_bar, st.size = 1, START + 5, 0.1
    with pytest.raises(ValueError, match="open position"):
        run_arrays(arrays, p, START, START + 100, state=st)
    assert isinstance(arrays.index, pd.DatetimeIndex)
