"""The compiled fast-mode kernel, and nothing else (vectorbt's ``portfolio/nb.py`` habit).

Plain arrays in, plain arrays out; every trading rule is a call into :mod:`backtest.policy` (the same functions the
live Trader calls), so this file only sequences them. ``cache=True`` keeps compilation between runs; fastmath stays
off so that results equal the step driver's bit for bit.

Speed: the open position's path (its exit bar, price and reason) depends only on the entry bar, the side, the fill
price and the stop/target distances — not on the account — so :func:`simulate_exit` walks it once per entry, with the
position model's trees evaluated inside the loop, and memoises it in ``traj_*`` arrays indexed by the fill bar. A
cache stays valid while ``sl_multiplier``, ``tp_multiplier``, ``exit_threshold``, ``max_holding_bars``, the costs and
the window end are unchanged (``backtest.engine`` keys it on those), so sweep trials that only change the
confidence threshold, the risk percent or the sessions never walk a tree of the position model again.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from backtest.policy import (
    EXIT_END,
    FLAT,
    N_ACC,
    N_POS,
    Params,
    book_exit,
    day_rollover,
    entry_fill,
    entry_gate,
    manage_bar,
    mark_equity,
    model_exit,
    model_risk_multiplier,
    position_size,
    stop_target_distances,
    time_exit,
)
from backtest.trees import CompiledTrees


@njit(cache=True)
def simulate_exit(e: int, side: int, entry: float, stop: float, target: float, open_: np.ndarray,
                  high: np.ndarray, low: np.ndarray, close: np.ndarray, spread: np.ndarray, atr: np.ndarray,
                  exit_X: np.ndarray, exit_trees: CompiledTrees, use_exit: bool, xbuf: np.ndarray, end: int,
                  p: Params) -> tuple[int, float, int]:
    """Walk a position filled at the open of bar ``e`` until it exits: ``(exit_bar, exit_price, reason)``.
    Per bar: :func:`manage_bar` (R9-R11, R13), then at the close :func:`time_exit` and :func:`model_exit` (R12) —
    the sequence ``Trader.on_bar`` runs."""
    pending = 0
    b = e
    while b < end:
        reason, px = manage_bar(pending, side, stop, target, open_[b], high[b], low[b], close[b], spread[b],
                                b == end - 1, p)
        if reason != 0:
            return b, px, reason
        pending = time_exit(b, e, p)
        if pending == 0 and use_exit:
            pending = model_exit(b, e, side, close[b], entry, stop, target, atr[b], exit_X[b], xbuf, exit_trees, p)
        b += 1
    return end - 1, np.nan, EXIT_END  # unreachable: manage_bar closes on the last bar


@njit(cache=True)
def run_kernel(open_: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray, spread: np.ndarray,
               hour: np.ndarray, day: np.ndarray, atr: np.ndarray, p_long: np.ndarray, p_short: np.ndarray,
               sl_atr: np.ndarray, tp_atr: np.ndarray, use_sltp: bool, exit_X: np.ndarray,
               exit_trees: CompiledTrees, use_exit: bool, vol_regime: np.ndarray, risk_trees: CompiledTrees,
               use_risk: bool, p: Params, start: int, end: int,
               traj_bar: np.ndarray, traj_price: np.ndarray, traj_reason: np.ndarray,
               t_entry: np.ndarray, t_exit: np.ndarray, t_side: np.ndarray, t_size: np.ndarray,
               t_entry_px: np.ndarray, t_exit_px: np.ndarray, t_stop: np.ndarray, t_target: np.ndarray,
               t_pnl: np.ndarray, t_r: np.ndarray, t_reason: np.ndarray, t_mult: np.ndarray,
               equity_out: np.ndarray, trip_bar: np.ndarray, trip_code: np.ndarray) -> tuple[int, int, int]:
    """Simulate bars ``[start, end)``; outputs go into the preallocated ``t_*`` (trades), ``equity_out`` (marked
    equity at each bar's close, indexed by bar) and ``trip_*`` arrays. Returns ``(n_trades, n_trips, skipped)``.

    ``traj_bar[e] < 0`` marks an unknown path for a fill at bar ``e``; known paths are reused (module docstring)."""
    cash = p.initial_equity
    peak = cash
    cur_day = -1
    day_start = cash
    daily_blocked = False
    loss_streak = 0
    cooldown_until = 0
    halted = False
    n_closed = 0
    ring_win = np.zeros(10)
    ring_eq = np.zeros(10)
    xbuf = np.empty(N_POS + exit_X.shape[1])
    abuf = np.empty(N_ACC)
    n_trades = 0
    n_trips = 0
    skipped = 0

    in_pos = False
    pend_side = FLAT
    pend_size = 0.0
    pend_sl = 0.0
    pend_tp = 0.0
    pend_mult = 1.0
    side = FLAT
    size = 0.0
    entry = 0.0
    stop = 0.0
    target = 0.0
    sl_dist = 0.0
    x_bar = -1
    x_px = 0.0

    for t in range(start, end):
        cur_day, day_start, daily_blocked = day_rollover(day[t], cur_day, cash, day_start, daily_blocked)
        if pend_side != FLAT:
            side = pend_side
            size = pend_size
            sl_dist = pend_sl
            entry = entry_fill(open_[t], side, spread[t], p)
            stop = entry - side * pend_sl
            target = entry + side * pend_tp
            pend_side = FLAT
            in_pos = True
            if traj_bar[t] < 0:
                xb, xp, xr = simulate_exit(t, side, entry, stop, target, open_, high, low, close, spread, atr,
                                           exit_X, exit_trees, use_exit, xbuf, end, p)
                traj_price[t] = xp
                traj_reason[t] = xr
                traj_bar[t] = xb
            x_bar = traj_bar[t]
            x_px = traj_price[t]
            t_entry[n_trades] = t
            t_side[n_trades] = side
            t_size[n_trades] = size
            t_entry_px[n_trades] = entry
            t_stop[n_trades] = stop
            t_target[n_trades] = target
            t_mult[n_trades] = pend_mult
            t_reason[n_trades] = traj_reason[t]
        if in_pos:
            if t == x_bar:
                pnl, r_mult, cash, peak, daily_blocked, loss_streak, cooldown_until, halted, n_closed, trips = \
                    book_exit(t, side, entry, x_px, size, sl_dist, cash, peak, day_start, daily_blocked,
                              loss_streak, cooldown_until, halted, ring_win, ring_eq, n_closed, p)
                t_exit[n_trades] = t
                t_exit_px[n_trades] = x_px
                t_pnl[n_trades] = pnl
                t_r[n_trades] = r_mult
                n_trades += 1
                in_pos = False
                side = FLAT
                for code in range(1, 4):
                    if trips & (1 << (code - 1)):
                        trip_bar[n_trips] = t
                        trip_code[n_trips] = code
                        n_trips += 1
                equity_out[t] = cash
            else:
                equity_out[t] = mark_equity(cash, side, entry, close[t], size, p)
        else:
            equity_out[t] = cash
        if (not in_pos) and t < end - 1:
            # policy.plan_entry's sequence, spelled out so that the scalar steps touch no array (see its docstring)
            s, code = entry_gate(t, p_long[t], p_short[t], hour[t], spread[t], halted, daily_blocked,
                                 cooldown_until, p)
            if s != FLAT:
                sl_d, tp_d, ok = stop_target_distances(sl_atr[t], tp_atr[t], atr[t], use_sltp, p)
                if ok:
                    mult = 1.0
                    sz = 1.0
                    if use_risk:
                        if position_size(cash, sl_d, p.risk_multiplier_max, p) <= 0.0:
                            sz = 0.0
                        else:
                            mult = model_risk_multiplier(cash, peak, loss_streak, ring_win, ring_eq, n_closed,
                                                         vol_regime[t], hour[t], risk_trees, abuf, p)
                    if sz > 0.0:
                        sz = position_size(cash, sl_d, mult, p)
                    if sz > 0.0:
                        pend_side = s
                        pend_size = sz
                        pend_sl = sl_d
                        pend_tp = tp_d
                        pend_mult = mult
                    else:
                        skipped += 1
    return n_trades, n_trips, skipped
