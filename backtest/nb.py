"""The compiled fast-mode kernel, and nothing else (vectorbt's ``portfolio/nb.py`` habit).

Data the vectorbt way: the kernel takes a few NamedTuples (:class:`KernelInputs` for the state-independent market
arrays and models, :class:`~backtest.policy.Params` for the scalars, :class:`~backtest.policy.Account` for the
starting account, :class:`PathMemo` for memoised position paths, :class:`KernelOut` for the outputs) and writes
trades into a record array of :data:`TRADE_DTYPE` and breaker trips into one of :data:`TRIP_DTYPE`. Every trading
rule is a call into :mod:`backtest.policy` (the same functions the live Trader calls), so this file only sequences
them. ``cache=True`` keeps compilation between runs; fastmath stays off so that results equal the step driver's bit
for bit.

Speed, three ideas:

* The open position's path (its exit bar, price and reason) depends only on the entry bar, the side, the fill price
  and the stop/target distances, not on the account, so :func:`simulate_exit` walks it once per entry (the position
  model's trees evaluated inside the loop) and memoises it in :class:`PathMemo` indexed by the fill bar. A memo stays
  valid while ``sl_multiplier``, ``tp_multiplier``, ``exit_threshold``, ``max_holding_bars``, the costs and the
  window end are unchanged (``backtest.engine`` keys it on those), so sweep trials that only change the confidence
  threshold, the risk percent or the sessions never walk a tree of the position model again.
* Event-driven: nothing can happen on a flat bar without a signal (rule R3 rejects it before any other rule), so
  the loop jumps from one signal bar to the next (``p_max = max(p_long, p_short)`` is compared with the threshold in
  a tight scan) and from a fill straight to its known exit bar; the bars in between only get their marked equity.
  The day rollover (R15) is applied lazily at the next bar that is processed: the realised equity cannot change in
  between, so the snapshot is the same (see :func:`backtest.policy.day_rollover`).
* The risk model's trees are walked with the branch-free walker of :mod:`backtest.trees`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from backtest.policy import (
    EXIT_END,
    FLAT,
    N_ACC,
    N_POS,
    TRIP_CODES,
    Account,
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
    stops_from_fill,
    time_exit,
    trip_bit,
)
from backtest.trees import CompiledTrees

TRADE_DTYPE = np.dtype([
    ("entry", np.int64),  # fill bar
    ("exit", np.int64),  # exit bar
    ("side", np.int64),  # LONG / SHORT
    ("size", np.float64),  # lots
    ("entry_px", np.float64),
    ("exit_px", np.float64),
    ("stop", np.float64),
    ("target", np.float64),
    ("pnl", np.float64),
    ("r", np.float64),  # R multiple
    ("reason", np.int64),  # EXIT_*
    ("mult", np.float64),  # risk multiplier
], align=True)
"""One closed trade (the fields of ``FastRun.trades``)."""

TRIP_DTYPE = np.dtype([("bar", np.int64), ("code", np.int64)], align=True)
"""One breaker trip: the bar it happened on and its TRIP_* code."""


class KernelInputs(NamedTuple):
    """Everything state-independent the kernel reads, one entry per bar (``backtest.engine.MarketArrays``)."""

    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    spread: np.ndarray
    hour: np.ndarray  # int64 decision hour (R1)
    day: np.ndarray  # int64 decision UTC day (R1)
    atr: np.ndarray
    p_long: np.ndarray
    p_short: np.ndarray
    p_max: np.ndarray  # max(p_long, p_short), NaN when either is NaN: the event scan's one comparison
    sl_atr: np.ndarray
    tp_atr: np.ndarray
    exit_X: np.ndarray  # (n, k) the position model's market columns
    vol_regime: np.ndarray
    exit_trees: CompiledTrees
    risk_trees: CompiledTrees
    use_sltp: bool
    use_exit: bool
    use_risk: bool


class PathMemo(NamedTuple):
    """Memoised position paths by fill bar: ``bar[e] < 0`` marks an unknown path (module docstring)."""

    bar: np.ndarray  # int64 exit bar
    price: np.ndarray  # float64 exit fill
    reason: np.ndarray  # int64 EXIT_*


class KernelOut(NamedTuple):
    """Preallocated outputs: ``trades`` (TRADE_DTYPE, >= n bars), ``trips`` (TRIP_DTYPE, >= 3 n bars), ``equity``
    (marked equity at each bar's close, indexed by bar)."""

    trades: np.ndarray
    trips: np.ndarray
    equity: np.ndarray


def new_memo(n: int) -> PathMemo:
    """An empty :class:`PathMemo` for ``n`` bars."""
    return PathMemo(np.full(n, -1, dtype=np.int64), np.empty(n), np.zeros(n, dtype=np.int64))


def new_out(n: int) -> KernelOut:
    """Output buffers for ``n`` bars (at most one trade and three trips per bar)."""
    return KernelOut(np.empty(n, dtype=TRADE_DTYPE), np.empty(3 * n + 4, dtype=TRIP_DTYPE), np.empty(n))


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


@njit(cache=True, inline="always")
def _decide(t: int, p_long: float, p_short: float, hour: int, spread: float, sl_atr: float, tp_atr: float,
            atr: float, vol_regime: float, use_sltp: bool, use_risk: bool, risk_trees: CompiledTrees, acc: Account,
            ring_win: np.ndarray, ring_eq: np.ndarray, abuf: np.ndarray, p: Params
            ) -> tuple[int, float, float, float, float, int]:
    """``policy.plan_entry``'s sequence at the close of bar ``t`` while flat (R3-R8), spelled out on scalars (the
    caller reads the bar's values once; numba's reference counting stays out of the loop; the parity test guards
    that the two agree). Returns ``(side, size, sl_dist, tp_dist, risk_mult, skipped)``; ``side == FLAT`` is no
    order."""
    s, _code = entry_gate(t, p_long, p_short, hour, spread, acc.halted, acc.daily_blocked, acc.cooldown_until, p)
    if s == FLAT:
        return FLAT, 0.0, 0.0, 0.0, 1.0, 0
    sl_d, tp_d, ok = stop_target_distances(sl_atr, tp_atr, atr, use_sltp, p)
    if not ok:
        return FLAT, 0.0, 0.0, 0.0, 1.0, 0
    mult = 1.0
    if use_risk:
        if position_size(acc.equity, sl_d, p.risk_multiplier_max, p) <= 0.0:
            return FLAT, 0.0, 0.0, 0.0, 1.0, 1
        mult = model_risk_multiplier(acc.equity, acc.peak, acc.loss_streak, ring_win, ring_eq, acc.n_closed,
                                     vol_regime, hour, risk_trees, abuf, p)
    sz = position_size(acc.equity, sl_d, mult, p)
    if sz <= 0.0:
        return FLAT, 0.0, 0.0, 0.0, 1.0, 1
    return s, sz, sl_d, tp_d, mult, 0


@njit(cache=True)
def run_kernel(m: KernelInputs, p: Params, start: int, end: int, acc: Account, ring_win: np.ndarray,
               ring_eq: np.ndarray, memo: PathMemo, out: KernelOut) -> tuple[int, int, int]:
    """Simulate bars ``[start, end)`` flat at ``start`` with the account ``acc`` (and its last trades in
    ``ring_win`` / ``ring_eq``, updated in place). Outputs go into ``out``; returns ``(n_trades, n_trips,
    skipped)``. Per bar the rules run in ``Trader.on_bar``'s order: day rollover, pending fill at the open,
    position management (R9-R13), equity mark, decision at the close (R2-R8, R14)."""
    # every array read once out of the NamedTuples: the loop then uses plain locals (no reference counting per use)
    open_, high, low, close, spread, hour, day, atr = m.open, m.high, m.low, m.close, m.spread, m.hour, m.day, m.atr
    p_long, p_short, p_max, sl_atr, tp_atr, exit_X, vol_regime = m.p_long, m.p_short, m.p_max, m.sl_atr, m.tp_atr, \
        m.exit_X, m.vol_regime
    exit_trees, risk_trees, use_sltp, use_exit, use_risk = m.exit_trees, m.risk_trees, m.use_sltp, m.use_exit, \
        m.use_risk
    m_bar, m_price, m_reason = memo.bar, memo.price, memo.reason
    xbuf = np.empty(N_POS + exit_X.shape[1])
    abuf = np.empty(N_ACC)
    eq = out.equity
    trades = out.trades
    trips = out.trips
    n_trades = 0
    n_trips = 0
    skipped = 0
    thr = p.confidence_threshold
    last = end - 1
    t = start
    while t < end:
        # flat: bars without a signal only mark equity (R3 rejects them before any other rule; module docstring)
        cash = acc.equity
        while t < last and not (p_max[t] >= thr):
            eq[t] = cash
            t += 1
        acc = day_rollover(day[t], acc)
        eq[t] = cash
        if t >= last:
            break  # R2/R13: no decision on the last bar
        side, size, sl_d, tp_d, mult, sk = _decide(t, p_long[t], p_short[t], hour[t], spread[t], sl_atr[t],
                                                   tp_atr[t], atr[t], vol_regime[t], use_sltp, use_risk,
                                                   risk_trees, acc, ring_win, ring_eq, abuf, p)
        skipped += sk
        t += 1
        if side == FLAT:
            continue
        # fill at the open of bar t (R5, R6), then the memoised path to its exit bar
        acc = day_rollover(day[t], acc)
        entry = entry_fill(open_[t], side, spread[t], p)
        stop, target = stops_from_fill(entry, side, sl_d, tp_d)
        if m_bar[t] < 0:
            xb, xp, xr = simulate_exit(t, side, entry, stop, target, open_, high, low, close, spread, atr, exit_X,
                                       exit_trees, use_exit, xbuf, end, p)
            m_price[t] = xp
            m_reason[t] = xr
            m_bar[t] = xb
        x_bar = m_bar[t]
        x_px = m_price[t]
        for b in range(t, x_bar):  # in position: equity marked at each close
            eq[b] = mark_equity(acc.equity, side, entry, close[b], size, p)
        acc = day_rollover(day[x_bar], acc)
        booked, acc = book_exit(x_bar, side, entry, x_px, size, sl_d, acc, ring_win, ring_eq, p)
        tr = trades[n_trades]
        tr["entry"] = t
        tr["exit"] = x_bar
        tr["side"] = side
        tr["size"] = size
        tr["entry_px"] = entry
        tr["exit_px"] = x_px
        tr["stop"] = stop
        tr["target"] = target
        tr["pnl"] = booked.pnl
        tr["r"] = booked.r_multiple
        tr["reason"] = m_reason[t]
        tr["mult"] = mult
        n_trades += 1
        for code in TRIP_CODES:
            if booked.trips & trip_bit(code):
                trips[n_trips]["bar"] = x_bar
                trips[n_trips]["code"] = code
                n_trips += 1
        t = x_bar  # R14: the close of the exit bar may open the next position
    return n_trades, n_trips, skipped
