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
    FLAT,
    N_ACC,
    N_POS,
    RING,
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
                  p: Params, b0: int = -1, pending0: int = 0, close_at_end: bool = True) -> tuple[int, float, int]:
    """Walk a position filled at the open of bar ``e`` until it exits: ``(exit_bar, exit_price, reason)``.
    Per bar: :func:`manage_bar` (R9-R11, R13), then at the close :func:`time_exit` and :func:`model_exit` (R12) —
    the sequence ``Trader.on_bar`` runs.

    ``b0`` / ``pending0`` continue a position carried in from a saved state (walk from bar ``b0`` with the pending
    exit decided at the previous close); with ``close_at_end=False`` a position still open after bar ``end - 1``
    returns ``(end, nan, 0)`` (it stays open, as in a live bot whose week goes on)."""
    pending = pending0
    b = e if b0 < 0 else b0
    while b < end:
        reason, px = manage_bar(pending, side, stop, target, open_[b], high[b], low[b], close[b], spread[b],
                                close_at_end and b == end - 1, p)
        if reason != 0:
            return b, px, reason
        pending = time_exit(b, e, p)
        if pending == 0 and use_exit:
            pending = model_exit(b, e, side, close[b], entry, stop, target, atr[b], exit_X[b], xbuf, exit_trees, p)
        b += 1
    return end, np.nan, 0  # still open (only reachable with close_at_end=False: manage_bar closes the last bar)


# Layout of the state vector a kernel run starts from and ends with (``backtest.engine`` converts it to and from
# :class:`backtest.policy.State`): account, breakers, the open position, the order pending at the next open, rings.
(ST_CASH, ST_PEAK, ST_DAY, ST_DAY_START, ST_DAILY_BLOCKED, ST_LOSS_STREAK, ST_COOLDOWN, ST_HALTED, ST_N_CLOSED,
 ST_SIDE, ST_SIZE, ST_ENTRY, ST_STOP, ST_TARGET, ST_SL_DIST, ST_ENTRY_BAR, ST_MULT, ST_PENDING_EXIT,
 ST_PEND_SIDE, ST_PEND_SIZE, ST_PEND_SL, ST_PEND_TP, ST_PEND_MULT) = range(23)
ST_RING_WIN = 23
ST_RING_EQ = ST_RING_WIN + RING
STATE_SIZE = ST_RING_EQ + RING


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
               equity_out: np.ndarray, trip_bar: np.ndarray, trip_code: np.ndarray, state0: np.ndarray,
               close_at_end: bool, state1: np.ndarray) -> tuple[int, int, int]:
    """Simulate bars ``[start, end)``; outputs go into the preallocated ``t_*`` (trades), ``equity_out`` (marked
    equity at each bar's close, indexed by bar) and ``trip_*`` arrays. Returns ``(n_trades, n_trips, skipped)``.

    The run starts from the state vector ``state0`` (layout ``ST_*``: a fresh account, or the state a previous run
    ended with, open position and pending order included) and writes the state it ends with into ``state1``. With
    ``close_at_end=False`` nothing is forced at the last bar (R13 off, a decision is taken at its close): the next
    run continues from ``state1`` exactly as one longer run would, which is what a live bot's week is. A position
    still open at the end is not in the trade table (it is in ``state1``); one carried in is recorded when it closes.

    ``traj_bar[e] < 0`` marks an unknown path for a fill at bar ``e``; known paths are reused (module docstring)."""
    cash = state0[ST_CASH]
    peak = state0[ST_PEAK]
    cur_day = int(state0[ST_DAY])
    day_start = state0[ST_DAY_START]
    daily_blocked = state0[ST_DAILY_BLOCKED] != 0.0
    loss_streak = int(state0[ST_LOSS_STREAK])
    cooldown_until = int(state0[ST_COOLDOWN])
    halted = state0[ST_HALTED] != 0.0
    n_closed = int(state0[ST_N_CLOSED])
    ring_win = state0[ST_RING_WIN:ST_RING_WIN + RING].copy()
    ring_eq = state0[ST_RING_EQ:ST_RING_EQ + RING].copy()
    xbuf = np.empty(N_POS + exit_X.shape[1])
    abuf = np.empty(N_ACC)
    n_trades = 0
    n_trips = 0
    skipped = 0

    pend_side = int(state0[ST_PEND_SIDE])
    pend_size = state0[ST_PEND_SIZE]
    pend_sl = state0[ST_PEND_SL]
    pend_tp = state0[ST_PEND_TP]
    pend_mult = state0[ST_PEND_MULT]
    side = int(state0[ST_SIDE])
    in_pos = side != FLAT
    size = state0[ST_SIZE]
    entry = state0[ST_ENTRY]
    stop = state0[ST_STOP]
    target = state0[ST_TARGET]
    sl_dist = state0[ST_SL_DIST]
    e_bar = int(state0[ST_ENTRY_BAR])
    cur_mult = state0[ST_MULT]
    x_bar = -1
    x_px = 0.0
    if in_pos:  # a position carried in: its path from here, under this run's models (not memoised)
        x_bar, x_px, xr = simulate_exit(e_bar, side, entry, stop, target, open_, high, low, close, spread, atr,
                                        exit_X, exit_trees, use_exit, xbuf, end, p, start,
                                        int(state0[ST_PENDING_EXIT]), close_at_end)
        t_entry[0] = e_bar
        t_side[0] = side
        t_size[0] = size
        t_entry_px[0] = entry
        t_stop[0] = stop
        t_target[0] = target
        t_mult[0] = cur_mult
        t_reason[0] = xr

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
            e_bar = t
            cur_mult = pend_mult
            if traj_bar[t] < 0:
                xb, xp, xr = simulate_exit(t, side, entry, stop, target, open_, high, low, close, spread, atr,
                                           exit_X, exit_trees, use_exit, xbuf, end, p, -1, 0, close_at_end)
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
        if (not in_pos) and (t < end - 1 or not close_at_end):
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
    state1[ST_CASH] = cash
    state1[ST_PEAK] = peak
    state1[ST_DAY] = cur_day
    state1[ST_DAY_START] = day_start
    state1[ST_DAILY_BLOCKED] = 1.0 if daily_blocked else 0.0
    state1[ST_LOSS_STREAK] = loss_streak
    state1[ST_COOLDOWN] = cooldown_until
    state1[ST_HALTED] = 1.0 if halted else 0.0
    state1[ST_N_CLOSED] = n_closed
    state1[ST_RING_WIN:ST_RING_WIN + RING] = ring_win
    state1[ST_RING_EQ:ST_RING_EQ + RING] = ring_eq
    state1[ST_SIDE] = side if in_pos else FLAT
    state1[ST_SIZE] = size if in_pos else 0.0
    state1[ST_ENTRY] = entry if in_pos else 0.0
    state1[ST_STOP] = stop if in_pos else 0.0
    state1[ST_TARGET] = target if in_pos else 0.0
    state1[ST_SL_DIST] = sl_dist if in_pos else 0.0
    state1[ST_ENTRY_BAR] = e_bar if in_pos else -1
    state1[ST_MULT] = cur_mult if in_pos else 1.0
    pending = 0
    if in_pos and end > start:  # the exit decided at the last close (what the walk computed there)
        b = end - 1
        pending = time_exit(b, e_bar, p)
        if pending == 0 and use_exit:
            pending = model_exit(b, e_bar, side, close[b], entry, stop, target, atr[b], exit_X[b], xbuf,
                                 exit_trees, p)
    state1[ST_PENDING_EXIT] = pending
    state1[ST_PEND_SIDE] = pend_side
    state1[ST_PEND_SIZE] = pend_size if pend_side != FLAT else 0.0
    state1[ST_PEND_SL] = pend_sl if pend_side != FLAT else 0.0
    state1[ST_PEND_TP] = pend_tp if pend_side != FLAT else 0.0
    state1[ST_PEND_MULT] = pend_mult if pend_side != FLAT else 1.0
    return n_trades, n_trips, skipped
