"""The compiled fast-mode kernel, and nothing else (vectorbt's ``portfolio/nb.py`` habit).

Data the vectorbt way: the kernel takes a few NamedTuples (:class:`KernelInputs` for the state-independent market
arrays and models, :class:`~backtest.policy.Params` for the scalars, :class:`~backtest.policy.Account` for the
starting account, :class:`PathMemo` for memoised position paths, :class:`KernelOut` for the outputs) and writes
trades into a record array of :data:`TRADE_DTYPE` and breaker trips into one of :data:`TRIP_DTYPE`. Every trading
rule is a call into :mod:`backtest.policy` (the same functions the live Trader calls), so this file only sequences
them. ``cache=True`` keeps compilation between runs; fastmath stays off so that results equal the step driver's bit
for bit.

Speed, four ideas:

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
* No reference counting: :func:`run_kernel` and :func:`simulate_exit` are compiled with ``_nrt=False`` (numba's
  runtime off). With it on, numba increments and decrements an atomic reference count for every array member of a
  NamedTuple each time the loop passes one on (KernelInputs and the two CompiledTrees hold ~50 arrays) and for every
  row view such as ``exit_X[b]``: ``perf`` put 30 % of a sweep in those two atomic instructions, and the kernel
  ran 2-5x slower (measured on bench/backtest_speed.py's workload, same results bit for bit). The price: these two
  functions may not allocate, so the scratch rows the models read come in with :class:`KernelOut`. The arrays they
  get are borrowed from the caller, which holds them for the whole call.

The kernel releases the GIL (``nogil``): the sweep runs its grid points in threads, each on its own
:meth:`backtest.engine.MarketArrays.fork` (own output buffers and path memo, shared market arrays).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from backtest.metrics import drawdown_step
from backtest.policy import (
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
    (marked equity at each bar's close, indexed by bar), the two scratch rows the models read (``xrow``: the
    position model's input, ``N_POS`` + its market columns wide; ``arow``: the risk model's, ``N_ACC`` wide) and the
    run's max drawdown (module docstring). The kernel allocates nothing itself (it is compiled without numba's
    reference counting)."""

    trades: np.ndarray
    trips: np.ndarray
    equity: np.ndarray
    xrow: np.ndarray
    arow: np.ndarray
    drawdown: np.ndarray  # [0]: the largest fall of ``equity[start:end]`` below its running peak, a fraction


def new_memo(n: int) -> PathMemo:
    """An empty :class:`PathMemo` for ``n`` bars."""
    return PathMemo(np.full(n, -1, dtype=np.int64), np.empty(n), np.zeros(n, dtype=np.int64))


def new_out(n: int, exit_cols: int) -> KernelOut:
    """Output buffers for ``n`` bars (at most one trade and three trips per bar) and a position model that reads
    ``exit_cols`` market columns."""
    return KernelOut(np.empty(n, dtype=TRADE_DTYPE), np.empty(3 * n + 4, dtype=TRIP_DTYPE), np.empty(n),
                     np.empty(N_POS + exit_cols), np.empty(N_ACC), np.zeros(1))


@njit(cache=True, _nrt=False, inline="always")
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


# Layout of the carry vector a kernel run starts from and ends with (``backtest.engine`` converts it to and from
# :class:`backtest.policy.State`; the account travels as an :class:`Account`, the rings as arrays): the open
# position (with the exit decided at the last close) and the order pending at the next open.
(C_SIDE, C_SIZE, C_ENTRY, C_STOP, C_TARGET, C_SL_DIST, C_ENTRY_BAR, C_MULT, C_PENDING_EXIT,
 C_PEND_SIDE, C_PEND_SIZE, C_PEND_SL, C_PEND_TP, C_PEND_MULT) = range(14)
CARRY_SIZE = 14


def flat_carry() -> np.ndarray:
    """A carry vector with no open position and no pending order."""
    c = np.zeros(CARRY_SIZE)
    c[C_ENTRY_BAR] = -1.0
    c[C_MULT] = 1.0
    c[C_PEND_MULT] = 1.0
    return c


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
def _record(trades: np.ndarray, n: int, e: int, x_bar: int, side: int, size: float, entry: float, x_px: float,
            stop: float, target: float, pnl: float, r: float, reason: int, mult: float) -> None:
    """Write one closed trade into the record array."""
    tr = trades[n]
    tr["entry"] = e
    tr["exit"] = x_bar
    tr["side"] = side
    tr["size"] = size
    tr["entry_px"] = entry
    tr["exit_px"] = x_px
    tr["stop"] = stop
    tr["target"] = target
    tr["pnl"] = pnl
    tr["r"] = r
    tr["reason"] = reason
    tr["mult"] = mult


@njit(cache=True, _nrt=False, nogil=True)
def run_kernel(m: KernelInputs, p: Params, start: int, end: int, acc: Account, ring_win: np.ndarray,
               ring_eq: np.ndarray, memo: PathMemo, out: KernelOut, carry: np.ndarray,
               close_at_end: bool) -> tuple[int, int, int, Account]:
    """Simulate bars ``[start, end)`` from the account ``acc`` (and its last trades in ``ring_win`` / ``ring_eq``,
    updated in place) and the open position / pending order in ``carry`` (layout ``C_*``; :func:`flat_carry` for
    none), which is overwritten with the ones the run ends with. Outputs go into ``out``; returns ``(n_trades,
    n_trips, skipped, final account)``. Per bar the rules run in ``Trader.on_bar``'s order: day rollover, pending
    fill at the open, position management (R9-R13), equity mark, decision at the close (R2-R8, R14). The marked
    equity's max drawdown goes to ``out.drawdown[0]`` (what the metrics would compute from the curve, bit for bit).

    With ``close_at_end=False`` nothing is forced at the last bar (R13 off, a decision is taken at its close): the
    next run continues from the returned account and ``carry`` exactly as one longer run would, which is what a
    live bot's week is. A position still open at the end is not in the trade table (it is in ``carry``); one
    carried in is recorded when it closes."""
    # every array read once out of the NamedTuples: the loop then uses plain locals (no reference counting per use)
    open_, high, low, close, spread, hour, day, atr = m.open, m.high, m.low, m.close, m.spread, m.hour, m.day, m.atr
    p_long, p_short, p_max, sl_atr, tp_atr, exit_X, vol_regime = m.p_long, m.p_short, m.p_max, m.sl_atr, m.tp_atr, \
        m.exit_X, m.vol_regime
    exit_trees, risk_trees, use_sltp, use_exit, use_risk = m.exit_trees, m.risk_trees, m.use_sltp, m.use_exit, \
        m.use_risk
    m_bar, m_price, m_reason = memo.bar, memo.price, memo.reason
    xbuf = out.xrow
    abuf = out.arow
    eq = out.equity
    trades = out.trades
    trips = out.trips
    n_trades = 0
    n_trips = 0
    skipped = 0
    thr = p.confidence_threshold
    last = end - 1
    dd_peak = p.initial_equity  # the running max drawdown of eq[start:end], peak starting at the initial equity
    dd = 0.0
    t = start
    # what the run ends with: an open position (o_*) and an order pending at the next open
    o_side = FLAT
    o_size = 0.0
    o_entry = 0.0
    o_stop = 0.0
    o_target = 0.0
    o_sl = 0.0
    o_bar = -1
    o_mult = 1.0
    pend_side = int(carry[C_PEND_SIDE])
    pend_size = carry[C_PEND_SIZE]
    pend_sl = carry[C_PEND_SL]
    pend_tp = carry[C_PEND_TP]
    pend_mult = carry[C_PEND_MULT]
    c_side = int(carry[C_SIDE])
    if c_side != FLAT and end > start:  # a position carried in: its path from here, under this run's models
        e0 = int(carry[C_ENTRY_BAR])
        entry, stop, target, size = carry[C_ENTRY], carry[C_STOP], carry[C_TARGET], carry[C_SIZE]
        x_bar, x_px, xr = simulate_exit(e0, c_side, entry, stop, target, open_, high, low, close, spread, atr,
                                        exit_X, exit_trees, use_exit, xbuf, end, p, start,
                                        int(carry[C_PENDING_EXIT]), close_at_end)
        for b in range(start, min(x_bar, end)):
            eq[b] = mark_equity(acc.equity, c_side, entry, close[b], size, p)
            dd_peak, dd = drawdown_step(eq[b], dd_peak, dd)
        if x_bar >= end:  # still open
            o_side, o_size, o_entry, o_stop, o_target = c_side, size, entry, stop, target
            o_sl, o_bar, o_mult = carry[C_SL_DIST], e0, carry[C_MULT]
            t = end
        else:
            acc = day_rollover(day[x_bar], acc)
            booked, acc = book_exit(x_bar, c_side, entry, x_px, size, carry[C_SL_DIST], acc, ring_win, ring_eq, p)
            _record(trades, n_trades, e0, x_bar, c_side, size, entry, x_px, stop, target, booked.pnl,
                    booked.r_multiple, xr, carry[C_MULT])
            n_trades += 1
            for code in TRIP_CODES:
                if booked.trips & trip_bit(code):
                    trips[n_trips]["bar"] = x_bar
                    trips[n_trips]["code"] = code
                    n_trips += 1
            t = x_bar  # R14: the close of the exit bar may open the next position (the loop decides there)
    while t < end:
        if pend_side == FLAT:
            # flat: bars without a signal only mark equity (R3 rejects them before any other rule; module docstring)
            cash = acc.equity
            dd_peak, dd = drawdown_step(cash, dd_peak, dd)  # every bar of this stretch, t included, is marked at cash
            while t < last and not (p_max[t] >= thr):
                eq[t] = cash
                t += 1
            acc = day_rollover(day[t], acc)
            eq[t] = cash
            if t >= last and close_at_end:
                break  # R2/R13: no decision on the last bar of a closed-out run
            pend_side, pend_size, pend_sl, pend_tp, pend_mult, sk = _decide(
                t, p_long[t], p_short[t], hour[t], spread[t], sl_atr[t], tp_atr[t], atr[t], vol_regime[t], use_sltp,
                use_risk, risk_trees, acc, ring_win, ring_eq, abuf, p)
            skipped += sk
            t += 1
            continue
        # fill at the open of bar t (R5, R6), then the memoised path to its exit bar
        side, size, sl_d, tp_d, mult = pend_side, pend_size, pend_sl, pend_tp, pend_mult
        pend_side = FLAT
        acc = day_rollover(day[t], acc)
        entry = entry_fill(open_[t], side, spread[t], p)
        stop, target = stops_from_fill(entry, side, sl_d, tp_d)
        if m_bar[t] < 0:
            xb, xp, xr = simulate_exit(t, side, entry, stop, target, open_, high, low, close, spread, atr, exit_X,
                                       exit_trees, use_exit, xbuf, end, p, -1, 0, close_at_end)
            m_price[t] = xp
            m_reason[t] = xr
            m_bar[t] = xb
        x_bar = m_bar[t]
        x_px = m_price[t]
        for b in range(t, min(x_bar, end)):  # in position: equity marked at each close
            eq[b] = mark_equity(acc.equity, side, entry, close[b], size, p)
            dd_peak, dd = drawdown_step(eq[b], dd_peak, dd)
        if x_bar >= end:  # still open at the end (close_at_end=False): it goes into the carry
            o_side, o_size, o_entry, o_stop, o_target, o_sl, o_bar, o_mult = side, size, entry, stop, target, sl_d, \
                t, mult
            break
        acc = day_rollover(day[x_bar], acc)
        booked, acc = book_exit(x_bar, side, entry, x_px, size, sl_d, acc, ring_win, ring_eq, p)
        _record(trades, n_trades, t, x_bar, side, size, entry, x_px, stop, target, booked.pnl, booked.r_multiple,
                m_reason[t], mult)
        n_trades += 1
        for code in TRIP_CODES:
            if booked.trips & trip_bit(code):
                trips[n_trips]["bar"] = x_bar
                trips[n_trips]["code"] = code
                n_trips += 1
        t = x_bar  # R14: the close of the exit bar may open the next position
    if end > start:
        acc = day_rollover(day[last], acc)  # the lazily skipped rollovers, so the final account is the Trader's
    pending = 0
    if o_side != FLAT and end > start:  # the exit decided at the last close (what the walk computed there)
        pending = time_exit(last, o_bar, p)
        if pending == 0 and use_exit:
            pending = model_exit(last, o_bar, o_side, close[last], o_entry, o_stop, o_target, atr[last],
                                 exit_X[last], xbuf, exit_trees, p)
    out.drawdown[0] = dd
    if end <= start and c_side != FLAT:  # an empty window carries the position through unchanged
        return n_trades, n_trips, skipped, acc
    carry[C_SIDE] = o_side
    carry[C_SIZE] = o_size
    carry[C_ENTRY] = o_entry
    carry[C_STOP] = o_stop
    carry[C_TARGET] = o_target
    carry[C_SL_DIST] = o_sl
    carry[C_ENTRY_BAR] = o_bar
    carry[C_MULT] = o_mult
    carry[C_PENDING_EXIT] = pending
    carry[C_PEND_SIDE] = pend_side
    carry[C_PEND_SIZE] = pend_size if pend_side != FLAT else 0.0
    carry[C_PEND_SL] = pend_sl if pend_side != FLAT else 0.0
    carry[C_PEND_TP] = pend_tp if pend_side != FLAT else 0.0
    carry[C_PEND_MULT] = pend_mult if pend_side != FLAT else 1.0
    return n_trades, n_trips, skipped, acc
