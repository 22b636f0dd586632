"""The trading rules: ONE implementation, called compiled by the fast kernel and from Python by the live Trader.

Every rule is a small numba ``@njit`` function on scalars (and a few preallocated buffers). ``backtest/nb.py`` calls
them inside its compiled loop; ``backtest/live.py`` (the live bot and the step-mode reference backtest) calls the very
same functions once per bar from Python. There is no second copy of any rule to drift out of sync; the parity test
proves the two drivers agree trade for trade.

Rules (the README quotes this list; each has a focused test in ``tests/test_backtest_policy.py``)
-------------------------------------------------------------------------------------------------
Clock
  R1. Bar ``t`` is processed when it closes. Its *decision time* is its close (open time + 15 min). The session hour
      and the UTC day of bar ``t`` are taken from that decision time (:func:`decision_clock`).
Entry
  R2. A decision is taken at the close of bar ``t`` only when flat, and only when a next bar exists in the window.
  R3. Side: long when ``p_long >= confidence_threshold`` and ``p_long >= p_short``; short when
      ``p_short >= confidence_threshold`` and ``p_short > p_long`` (the larger wins; a tie goes long); NaN = no trade.
  R4. Filters, all required: not halted, ``t >= cooldown_until``, the daily-loss breaker not tripped today, the
      session allowed (the decision hour lies in one of ``trading.sessions``, see :data:`core.config.SESSIONS`), the
      decision bar's spread ``<= breakers.max_spread_points``, ``atr > 0`` and finite stop/target distances.
  R5. Fill at the open of bar ``t + 1``, paying half the spread of the fill bar plus slippage:
      ``entry = open[t+1] + side * (spread[t+1] / 2 + slippage_points) * point``.
  R6. Stop / target distances (price units), fixed at the decision:
      ``sl_dist = sl_atr[t] * sl_multiplier * atr[t]``, ``tp_dist = tp_atr[t] * tp_multiplier * atr[t]`` where
      ``sl_atr``/``tp_atr`` are the SL/TP models' predictions for bar ``t`` (state-independent), or
      ``trading.fixed_sl_atr`` / ``fixed_tp_atr`` without those models. They are anchored on the fill price:
      ``stop = entry - side * sl_dist``, ``target = entry + side * tp_dist``.
  R7. Size (lots) = ``equity * risk_percent / 100 * risk_multiplier / (sl_dist * contract_size +
      2 * commission_per_lot)``, i.e. the money lost at the stop including the round-trip commission equals the risk
      budget; floored to ``volume_step`` (with a 1e-9 tolerance against float noise), clamped to ``volume_max``; a
      size below ``volume_min`` means no trade: the decision is counted in ``skipped_size`` and nothing else happens.
      ``equity`` is the realised equity (always the whole equity: one position at a time and we are flat).
  R8. ``risk_multiplier`` = the risk model's prediction on :data:`ACCOUNT_STATE_FEATURES` at the decision, clamped to
      ``[risk_multiplier_min, risk_multiplier_max]``; 1.0 without a risk model.
Position management (per bar, :func:`manage_bar`)
  R9. A pending market exit (decided at the previous close) fills at this bar's open, before anything else.
  R10. Stop and target are live from the fill bar itself and are checked on every bar's open/high/low: a bar that
      *opens* beyond the stop (or target) fills at that open (gap); otherwise ``low <= stop`` (long) fills at the stop,
      ``high >= target`` at the target; when one bar touches both, the stop counts first (conservative).
  R11. Every exit fill pays half the spread of its bar plus slippage: ``exit = level - side * (spread/2 + slippage)
      * point``; pnl = ``side * (exit - entry) * size * contract_size - 2 * commission_per_lot * size``.
  R12. At the close of each bar with the position still open: if it has been open ``held = t - entry_bar + 1 >=
      max_holding_bars`` bars, exit at the next open (reason ``time``); else if the position model's exit probability
      on ``[POSITION_STATE_FEATURES at this close] + [its market features of this bar] >= exit_threshold``, exit at
      the next open (reason ``model``).
  R13. On the last bar of the window an open position is closed at that bar's close (with exit costs, reason
      ``end``); no decision is taken there.
  R14. A decision at the close of the bar on which a position exited (at its open, intrabar, or at a gap) may open a
      new position. One position at a time.
Breakers (evaluated on realised equity when a trade closes, :func:`book_exit`; each trip is recorded with its bar)
  R15. Daily loss: the realised equity has fallen ``>= daily_loss_limit_pct`` % below the realised equity at the
      start of the current UTC day (the first bar of the day snapshots it) -> no new entries until the next UTC day.
      An open position is not closed by a breaker.
  R16. Losing streak: a trade with pnl < 0 extends the streak, any other resets it; every time the streak reaches a
      multiple of ``max_consecutive_losses`` the cool-down starts: decisions at bars ``< exit_bar + cooldown_bars``
      are blocked (so the decision at the close of the exit bar itself is blocked when ``cooldown_bars >= 1``).
  R17. Drawdown halt: realised equity ``>= max_drawdown_halt_pct`` % below its running peak -> no new entries for the
      rest of the run (the live bot: until a person resets the state).
Not modelled: margin, swaps/financing, partial fills, broker stop levels.

State features (inputs of the position and risk models; name lists below, values by the njit fillers)
  POSITION_STATE_FEATURES at the close of bar ``t`` with ATR ``a = atr[t]``: ``side`` (+1/-1), ``age_bars`` (=
  held), ``unrealised_atr = side * (close - entry) / a``, ``dist_sl_atr = side * (close - stop) / a``,
  ``dist_tp_atr = side * (target - close) / a`` (NaN when ``a`` is not > 0). The position model's row is these five
  followed by its own market feature columns (``Predictor.exit_model``).
  ACCOUNT_STATE_FEATURES at a decision: ``dd_from_peak_pct`` (realised, % below peak), ``recent_win_rate`` (share of
  pnl > 0 among the last 10 closed trades; 0.5 with none), ``losing_streak`` (current consecutive losses),
  ``equity_slope`` (realised equity now / realised equity before the oldest of the last 10 trades - 1; 0 with none),
  ``vol_regime`` (``atr / median(atr over the last VOL_REGIME_BARS bars)``, :func:`vol_regime_at`), ``session_code``
  (bitmask of the sessions active at the decision hour: 1 asia, 2 london, 4 new_york).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numba import njit

from backtest.numba_cache import purge_stale_cache
from backtest.trees import CompiledTrees, predict
from core.config import SESSIONS, Config

BAR_SECONDS = 15 * 60
RING = 10  # trades remembered for recent_win_rate / equity_slope
VOL_REGIME_BARS = 96  # one day of M15 bars for the ATR median of vol_regime

LONG, SHORT, FLAT = 1, -1, 0

EXIT_STOP, EXIT_TARGET, EXIT_MODEL, EXIT_TIME, EXIT_END = 1, 2, 3, 4, 5
EXIT_REASONS = {EXIT_STOP: "stop", EXIT_TARGET: "target", EXIT_MODEL: "model", EXIT_TIME: "time", EXIT_END: "end"}

TRIP_DAILY_LOSS, TRIP_LOSS_STREAK, TRIP_DRAWDOWN_HALT = 1, 2, 3
TRIP_REASONS = {TRIP_DAILY_LOSS: "daily_loss", TRIP_LOSS_STREAK: "loss_streak", TRIP_DRAWDOWN_HALT: "drawdown_halt"}
TRIP_CODES = (TRIP_DAILY_LOSS, TRIP_LOSS_STREAK, TRIP_DRAWDOWN_HALT)  # the order trips of one trade are recorded in

# entry_gate() codes: why no entry was taken at a decision (the live bot logs them)
GATE_OK, GATE_NO_SIGNAL, GATE_HALTED, GATE_DAILY, GATE_COOLDOWN, GATE_SESSION, GATE_SPREAD, GATE_BAD_INPUT, \
    GATE_SIZE = 0, 1, 2, 3, 4, 5, 6, 7, 8
GATE_REASONS = {GATE_OK: "ok", GATE_NO_SIGNAL: "no_signal", GATE_HALTED: "halted", GATE_DAILY: "daily_loss",
                GATE_COOLDOWN: "cooldown", GATE_SESSION: "session", GATE_SPREAD: "spread",
                GATE_BAD_INPUT: "bad_input", GATE_SIZE: "size_below_min"}

POSITION_STATE_FEATURES = ["side", "age_bars", "unrealised_atr", "dist_sl_atr", "dist_tp_atr"]
ACCOUNT_STATE_FEATURES = ["dd_from_peak_pct", "recent_win_rate", "losing_streak", "equity_slope", "vol_regime",
                          "session_code"]
N_POS = len(POSITION_STATE_FEATURES)
N_ACC = len(ACCOUNT_STATE_FEATURES)

SESSION_BITS = {name: 1 << i for i, name in enumerate(SESSIONS)}
# Session bitmask per UTC hour, frozen into the compiled code (SESSIONS is a constant of core/config.py).
_HOUR_CODE = np.array(
    [sum(bit for name, bit in SESSION_BITS.items() if SESSIONS[name][0] <= h < SESSIONS[name][1]) for h in range(24)],
    dtype=np.int64,
)


class Params(NamedTuple):
    """Every scalar the rules read, flattened from the config (a NamedTuple so numba compiles it once)."""

    confidence_threshold: float
    risk_percent: float
    sl_multiplier: float
    tp_multiplier: float
    session_mask: int
    fixed_sl_atr: float
    fixed_tp_atr: float
    max_holding_bars: int
    exit_threshold: float
    risk_multiplier_min: float
    risk_multiplier_max: float
    initial_equity: float
    daily_loss_limit_pct: float
    max_consecutive_losses: int
    cooldown_bars: int
    max_drawdown_halt_pct: float
    max_spread_points: float
    commission_per_lot: float
    slippage_points: float
    contract_size: float
    point: float
    volume_min: float
    volume_step: float
    volume_max: float


_PARAM_TYPES = {f: (int if f in {"session_mask", "max_holding_bars", "max_consecutive_losses", "cooldown_bars"}
                    else float) for f in Params._fields}


def sessions_mask(names: list[str] | tuple[str, ...]) -> int:
    """Bitmask of session names (see :data:`SESSION_BITS`)."""
    mask = 0
    for n in names:
        mask |= SESSION_BITS[n]
    return mask


def make_params(cfg: Config, **overrides: Any) -> Params:
    """Params from a validated config; ``overrides`` replace single fields (``sessions=[...]`` is accepted too).

    The sweep and Optuna call this (or :func:`replace_params`) per trial instead of re-validating a whole config."""
    t, b, c, s = cfg.trading, cfg.breakers, cfg.costs, cfg.symbol_spec
    vals: dict[str, Any] = {
        "confidence_threshold": t.confidence_threshold, "risk_percent": t.risk_percent,
        "sl_multiplier": t.sl_multiplier, "tp_multiplier": t.tp_multiplier, "session_mask": sessions_mask(t.sessions),
        "fixed_sl_atr": t.fixed_sl_atr, "fixed_tp_atr": t.fixed_tp_atr, "max_holding_bars": t.max_holding_bars,
        "exit_threshold": t.exit_threshold, "risk_multiplier_min": t.risk_multiplier_min,
        "risk_multiplier_max": t.risk_multiplier_max, "initial_equity": t.initial_equity,
        "daily_loss_limit_pct": b.daily_loss_limit_pct, "max_consecutive_losses": b.max_consecutive_losses,
        "cooldown_bars": b.cooldown_bars, "max_drawdown_halt_pct": b.max_drawdown_halt_pct,
        "max_spread_points": b.max_spread_points, "commission_per_lot": c.commission_per_lot,
        "slippage_points": c.slippage_points, "contract_size": s.contract_size, "point": s.point,
        "volume_min": s.volume_min, "volume_step": s.volume_step, "volume_max": s.volume_max,
    }
    return replace_params(Params(**vals), **overrides)


def replace_params(p: Params, **overrides: Any) -> Params:
    """A copy with fields replaced, types coerced (a float where an int is expected would force a recompile)."""
    if "sessions" in overrides:
        overrides["session_mask"] = sessions_mask(overrides.pop("sessions"))
    unknown = set(overrides) - set(Params._fields)
    if unknown:
        raise KeyError(f"unknown params: {sorted(unknown)}")
    return p._replace(**{k: _PARAM_TYPES[k](v) for k, v in overrides.items()})


class Account(NamedTuple):
    """The realised account and breaker state carried from trade to trade (rules R7, R15-R17).

    A NamedTuple so the kernel passes it by value with one type (one compilation); the live :class:`State` holds
    the same fields (:meth:`State.account`, :meth:`State.set_account`). The last ``RING`` trades live in two
    separate buffers (``ring_win``, ``ring_eq``) because they are arrays."""

    equity: float  # realised
    peak: float  # realised running peak
    day: int  # UTC day number of the last processed bar, -1 before the first
    day_start_equity: float
    daily_blocked: bool
    loss_streak: int
    cooldown_until: int
    halted: bool
    n_closed: int


class BookedExit(NamedTuple):
    """What :func:`book_exit` reports about the trade it closed."""

    pnl: float
    r_multiple: float
    trips: int  # bit ``trip_bit(code)`` set for each breaker that tripped on this trade


@njit(cache=True, inline="always")
def initial_account(equity: float) -> Account:
    """A fresh account: no day seen yet, nothing blocked (compiled, so Python and the kernel type it alike)."""
    e = float(equity)
    return Account(e, e, -1, e, False, 0, 0, False, 0)


# ----------------------------------------------------------------------------------------------------------- clock
def decision_clock(time_ns: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """(UTC hour, UTC day number) of each bar's decision time = bar open + 15 min (rule R1). Integer arithmetic so
    the vectorised (fast) and per-bar (step/live) paths agree exactly."""
    secs = np.asarray(time_ns, dtype=np.int64) // 1_000_000_000 + BAR_SECONDS
    return (secs // 3600) % 24, secs // 86400


@njit(cache=True, inline="always")
def session_code(hour: int) -> int:
    """Bitmask of the sessions active at a UTC hour (1 asia, 2 london, 4 new_york)."""
    return _HOUR_CODE[hour]


@njit(cache=True, inline="always")
def session_allowed(hour: int, mask: int) -> bool:
    """Rule R4 (session): the decision hour lies in at least one allowed session."""
    return (session_code(hour) & mask) != 0


# ------------------------------------------------------------------------------------------------------- prices
@njit(cache=True, inline="always")
def fill_cost(spread_points: float, p: Params) -> float:
    """Half the spread plus slippage, in price units (rules R5, R11)."""
    return (0.5 * spread_points + p.slippage_points) * p.point


@njit(cache=True, inline="always")
def entry_fill(open_price: float, side: int, spread_points: float, p: Params) -> float:
    """Rule R5: the entry pays the cost in the trade's direction."""
    return open_price + side * fill_cost(spread_points, p)


@njit(cache=True, inline="always")
def exit_fill(level: float, side: int, spread_points: float, p: Params) -> float:
    """Rule R11: an exit at ``level`` (stop, target, open or close) pays the cost against the trade."""
    return level - side * fill_cost(spread_points, p)


@njit(cache=True, inline="always")
def trade_pnl(side: int, entry: float, exit_price: float, size: float, p: Params) -> float:
    """Rule R11: price pnl minus commission on both sides."""
    return side * (exit_price - entry) * size * p.contract_size - 2.0 * p.commission_per_lot * size


@njit(cache=True, inline="always")
def mark_equity(cash: float, side: int, entry: float, close: float, size: float, p: Params) -> float:
    """Equity marked at a close: realised cash plus the open trade's price pnl minus its (already paid) entry
    commission. The exit costs are only booked when the trade closes."""
    if side == 0:
        return cash
    return cash + side * (close - entry) * size * p.contract_size - p.commission_per_lot * size


# -------------------------------------------------------------------------------------------------------- entry
@njit(cache=True, inline="always")
def entry_side(p_long: float, p_short: float, threshold: float) -> int:
    """Rule R3."""
    if p_long >= threshold and p_long >= p_short:
        return LONG
    if p_short >= threshold and p_short > p_long:
        return SHORT
    return FLAT


@njit(cache=True, inline="always")
def entry_gate(bar: int, p_long: float, p_short: float, hour: int, spread_points: float, halted: bool,
               daily_blocked: bool, cooldown_until: int, p: Params) -> tuple[int, int]:
    """Rules R3-R4 in one place: (side, GATE_* code). The signal is tested first because it rejects most bars."""
    side = entry_side(p_long, p_short, p.confidence_threshold)
    if side == FLAT:
        return FLAT, GATE_NO_SIGNAL
    if halted:
        return FLAT, GATE_HALTED
    if daily_blocked:
        return FLAT, GATE_DAILY
    if bar < cooldown_until:
        return FLAT, GATE_COOLDOWN
    if not session_allowed(hour, p.session_mask):
        return FLAT, GATE_SESSION
    if spread_points > p.max_spread_points:
        return FLAT, GATE_SPREAD
    return side, GATE_OK


@njit(cache=True, inline="always")
def stop_target_distances(sl_atr: float, tp_atr: float, atr: float, use_model: bool,
                          p: Params) -> tuple[float, float, bool]:
    """Rule R6: ``(sl_dist, tp_dist, usable)`` in price units; unusable (NaN, <= 0, ATR not > 0) means no trade."""
    if not use_model:
        sl_atr = p.fixed_sl_atr
        tp_atr = p.fixed_tp_atr
    sl_d = sl_atr * p.sl_multiplier * atr
    tp_d = tp_atr * p.tp_multiplier * atr
    ok = atr > 0.0 and sl_d > 0.0 and tp_d > 0.0 and np.isfinite(sl_d) and np.isfinite(tp_d)
    return sl_d, tp_d, ok


@njit(cache=True, inline="always")
def stops_from_fill(entry: float, side: int, sl_dist: float, tp_dist: float) -> tuple[float, float]:
    """Rule R6 (second half): stop and target anchored on the fill price, ``(stop, target)``. The one place the
    kernel, the Trader and the position / SL-TP label simulations take them from."""
    return entry - side * sl_dist, entry + side * tp_dist


@njit(cache=True, inline="always")
def position_size(equity: float, sl_dist: float, risk_mult: float, p: Params) -> float:
    """Rule R7: lots, or 0.0 when below ``volume_min`` (no trade). Not rounded beyond the step arithmetic: both
    drivers compute the same float; the live order path normalises it to the broker's digits."""
    per_lot = sl_dist * p.contract_size + 2.0 * p.commission_per_lot
    raw = equity * p.risk_percent / 100.0 * risk_mult / per_lot
    if not raw > 0.0:
        return 0.0
    vol = np.floor(raw / p.volume_step + 1e-9) * p.volume_step
    if vol > p.volume_max:
        vol = p.volume_max
    if vol < p.volume_min - 1e-12:
        return 0.0
    return vol


@njit(cache=True, inline="always")
def risk_multiplier(prediction: float, p: Params) -> float:
    """Rule R8: the risk model's output clamped to the configured band (NaN -> 1.0)."""
    if np.isnan(prediction):
        return 1.0
    return min(max(prediction, p.risk_multiplier_min), p.risk_multiplier_max)


@njit(cache=True, inline="always")
def account_state_features(out: np.ndarray, equity: float, peak: float, loss_streak: int, ring_win: np.ndarray,
                           ring_eq: np.ndarray, n_closed: int, vol_regime: float, hour: int) -> None:
    """Fill ``out[:6]`` with :data:`ACCOUNT_STATE_FEATURES` (definitions in the module docstring)."""
    out[0] = (peak - equity) / peak * 100.0 if peak > 0.0 else 0.0
    m = min(n_closed, RING)
    if m == 0:
        out[1] = 0.5
        out[3] = 0.0
    else:
        w = 0.0
        for k in range(m):
            w += ring_win[k]
        out[1] = w / m
        oldest = n_closed % RING if n_closed >= RING else 0
        out[3] = equity / ring_eq[oldest] - 1.0 if ring_eq[oldest] > 0.0 else 0.0
    out[2] = loss_streak
    out[4] = vol_regime
    out[5] = session_code(hour)


@njit(cache=True, inline="always")
def model_risk_multiplier(equity: float, peak: float, loss_streak: int, ring_win: np.ndarray, ring_eq: np.ndarray,
                          n_closed: int, vol_regime: float, hour: int, risk_trees: CompiledTrees, abuf: np.ndarray,
                          p: Params) -> float:
    """Rule R8 with a risk model: its prediction on the account state, clamped."""
    account_state_features(abuf, equity, peak, loss_streak, ring_win, ring_eq, n_closed, vol_regime, hour)
    return risk_multiplier(predict(risk_trees, abuf), p)


@njit(cache=True)
def plan_entry(bar: int, p_long: float, p_short: float, hour: int, spread_points: float, atr: float, sl_atr: float,
               tp_atr: float, use_sltp: bool, vol_regime: float, equity: float, peak: float, loss_streak: int,
               ring_win: np.ndarray, ring_eq: np.ndarray, n_closed: int, halted: bool, daily_blocked: bool,
               cooldown_until: int, risk_trees: CompiledTrees, use_risk: bool, abuf: np.ndarray,
               p: Params) -> tuple[int, int, float, float, float, float]:
    """The whole entry decision at a close while flat (rules R3-R8), in this order:
    :func:`entry_gate` -> :func:`stop_target_distances` -> (risk model, skipped when even the band's top
    multiplier cannot reach ``volume_min``: the size is monotone in it) -> :func:`position_size`.

    ``backtest/nb.py`` spells out the same sequence of calls inline (so that the scalar-only steps run without
    touching any array, which keeps numba's reference counting out of the per-bar path); the parity test guards
    that the two stay identical. Returns ``(side, gate_code, sl_dist, tp_dist, risk_mult, size)``; ``side == 0``
    means no order; ``GATE_SIZE`` means it was dropped for a size below ``volume_min`` (counted as skipped)."""
    side, code = entry_gate(bar, p_long, p_short, hour, spread_points, halted, daily_blocked, cooldown_until, p)
    if side == FLAT:
        return FLAT, code, np.nan, np.nan, np.nan, 0.0
    sl_d, tp_d, ok = stop_target_distances(sl_atr, tp_atr, atr, use_sltp, p)
    if not ok:
        return FLAT, GATE_BAD_INPUT, np.nan, np.nan, np.nan, 0.0
    mult = 1.0
    if use_risk:
        if position_size(equity, sl_d, p.risk_multiplier_max, p) <= 0.0:
            return FLAT, GATE_SIZE, sl_d, tp_d, p.risk_multiplier_max, 0.0
        mult = model_risk_multiplier(equity, peak, loss_streak, ring_win, ring_eq, n_closed, vol_regime, hour,
                                     risk_trees, abuf, p)
    size = position_size(equity, sl_d, mult, p)
    if size <= 0.0:
        return FLAT, GATE_SIZE, sl_d, tp_d, mult, 0.0
    return side, GATE_OK, sl_d, tp_d, mult, size


# --------------------------------------------------------------------------------------------------- management
@njit(cache=True, inline="always")
def bar_exit(side: int, stop: float, target: float, o: float, h: float, lo: float) -> tuple[int, float]:
    """Rule R10: (EXIT_* or 0, price level). Gap at the open first, then stop before target inside the bar."""
    if side == LONG:
        if o <= stop:
            return EXIT_STOP, o
        if o >= target:
            return EXIT_TARGET, o
        if lo <= stop:
            return EXIT_STOP, stop
        if h >= target:
            return EXIT_TARGET, target
    else:
        if o >= stop:
            return EXIT_STOP, o
        if o <= target:
            return EXIT_TARGET, o
        if h >= stop:
            return EXIT_STOP, stop
        if lo <= target:
            return EXIT_TARGET, target
    return 0, np.nan


@njit(cache=True, inline="always")
def manage_bar(pending_exit: int, side: int, stop: float, target: float, o: float, h: float, lo: float, c: float,
               spread_points: float, is_last: bool, p: Params) -> tuple[int, float]:
    """The price part of one bar of an open position (rules R9-R11, R13): ``(exit_reason or 0, exit fill)``.
    When the position survives the bar the driver asks :func:`time_exit`, then :func:`model_exit`, at the close."""
    if pending_exit != 0:
        return pending_exit, exit_fill(o, side, spread_points, p)
    reason, level = bar_exit(side, stop, target, o, h, lo)
    if reason != 0:
        return reason, exit_fill(level, side, spread_points, p)
    if is_last:
        return EXIT_END, exit_fill(c, side, spread_points, p)
    return 0, np.nan


@njit(cache=True, inline="always")
def time_exit(bar: int, entry_bar: int, p: Params) -> int:
    """Rule R12 (first half): EXIT_TIME when the position has been open ``max_holding_bars`` bars at this close."""
    return EXIT_TIME if bar - entry_bar + 1 >= p.max_holding_bars else 0


@njit(cache=True, inline="always")
def position_state_features(out: np.ndarray, side: int, held: int, close: float, entry: float, stop: float,
                            target: float, atr: float) -> None:
    """Fill ``out[:5]`` with :data:`POSITION_STATE_FEATURES`."""
    out[0] = side
    out[1] = held
    if atr > 0.0:
        out[2] = side * (close - entry) / atr
        out[3] = side * (close - stop) / atr
        out[4] = side * (target - close) / atr
    else:
        out[2] = np.nan
        out[3] = np.nan
        out[4] = np.nan


@njit(cache=True, inline="always")
def model_exit(bar: int, entry_bar: int, side: int, close: float, entry: float, stop: float, target: float,
               atr: float, market_row: np.ndarray, xbuf: np.ndarray, exit_trees: CompiledTrees, p: Params) -> int:
    """Rule R12 (second half): EXIT_MODEL when the position model's exit probability on ``[position state at this
    close] + market_row`` reaches ``exit_threshold``. ``xbuf`` is a reusable row of width 5 + len(market_row)."""
    position_state_features(xbuf, side, bar - entry_bar + 1, close, entry, stop, target, atr)
    for j in range(market_row.size):
        xbuf[N_POS + j] = market_row[j]
    return EXIT_MODEL if predict(exit_trees, xbuf) >= p.exit_threshold else 0


# ----------------------------------------------------------------------------------------------------- breakers
@njit(cache=True, inline="always")
def trip_bit(code: int) -> int:
    """The bit of breaker ``code`` (TRIP_*) in :attr:`BookedExit.trips`."""
    return 1 << (code - 1)


@njit(cache=True, inline="always")
def day_rollover(day: int, acc: Account) -> Account:
    """Rule R15's reset: the first bar of a new UTC day snapshots the realised equity and lifts the daily block.

    Idempotent within a day and a no-op on equity, so a driver may call it only at the bars where something can
    happen (the kernel skips flat bars without a signal): while no trade closes the realised equity is constant and
    the snapshot is the same whichever bar of the day takes it."""
    if day != acc.day:
        return Account(acc.equity, acc.peak, day, acc.equity, False, acc.loss_streak, acc.cooldown_until,
                       acc.halted, acc.n_closed)
    return acc


@njit(cache=True, inline="always")
def book_exit(bar: int, side: int, entry: float, exit_price: float, size: float, sl_dist: float, acc: Account,
              ring_win: np.ndarray, ring_eq: np.ndarray, p: Params) -> tuple[BookedExit, Account]:
    """Close a trade: pnl, R multiple, the account update and the breakers (rules R11, R15-R17).

    Returns the :class:`BookedExit` (pnl, R multiple, trip bits) and the updated :class:`Account`; the trade is
    also pushed into the ``ring_*`` buffers."""
    pnl = trade_pnl(side, entry, exit_price, size, p)
    risk_money = size * (sl_dist * p.contract_size + 2.0 * p.commission_per_lot)
    r_mult = pnl / risk_money if risk_money > 0.0 else 0.0
    n_closed = acc.n_closed
    k = n_closed % RING
    ring_win[k] = 1.0 if pnl > 0.0 else 0.0
    ring_eq[k] = acc.equity
    n_closed += 1
    equity = acc.equity + pnl
    peak = acc.peak
    if equity > peak:
        peak = equity
    loss_streak = acc.loss_streak
    cooldown_until = acc.cooldown_until
    daily_blocked = acc.daily_blocked
    halted = acc.halted
    day_start_equity = acc.day_start_equity
    trips = 0
    if pnl < 0.0:
        loss_streak += 1
        if loss_streak % p.max_consecutive_losses == 0:
            cooldown_until = bar + p.cooldown_bars
            trips |= trip_bit(TRIP_LOSS_STREAK)
    else:
        loss_streak = 0
    if (not daily_blocked) and day_start_equity > 0.0 and \
            (day_start_equity - equity) / day_start_equity * 100.0 >= p.daily_loss_limit_pct:
        daily_blocked = True
        trips |= trip_bit(TRIP_DAILY_LOSS)
    if (not halted) and peak > 0.0 and (peak - equity) / peak * 100.0 >= p.max_drawdown_halt_pct:
        halted = True
        trips |= trip_bit(TRIP_DRAWDOWN_HALT)
    return BookedExit(pnl, r_mult, trips), Account(equity, peak, acc.day, day_start_equity, daily_blocked,
                                                    loss_streak, cooldown_until, halted, n_closed)


# --------------------------------------------------------------------------------------------------- vol regime
@njit(cache=True, inline="always")
def vol_regime_at(atr: np.ndarray, i: int, k: int) -> float:
    """``atr[i] / median(atr[i-k+1 .. i])``; NaN until ``k`` finite positive values exist. The step driver calls it
    on its bounded window, the fast path on the full series: same function, same value."""
    if i - k + 1 < 0:
        return np.nan
    w = np.empty(k, dtype=np.float64)
    for j in range(k):
        v = atr[i - k + 1 + j]
        if not (v > 0.0 and np.isfinite(v)):
            return np.nan
        w[j] = v
    w.sort()
    med = w[k // 2] if k % 2 == 1 else 0.5 * (w[k // 2 - 1] + w[k // 2])
    return atr[i] / med


@njit(cache=True, inline="always")
def vol_regime_series(atr: np.ndarray, k: int) -> np.ndarray:
    """:func:`vol_regime_at` for every bar."""
    out = np.empty(atr.size, dtype=np.float64)
    for i in range(atr.size):
        out[i] = vol_regime_at(atr, i, k)
    return out


# -------------------------------------------------------------------------------------------------------- state
@dataclass
class State:
    """Everything the trading loop remembers between bars: small, explicit, JSON round-trippable.

    The live bot saves it after every bar and restores it on restart (also mid-position). ``bar`` counters are the
    driver's own monotonically increasing bar numbers (array positions in a backtest)."""

    equity: float  # realised
    peak: float  # realised running peak
    day: int = -1  # UTC day number of the last processed decision time
    day_start_equity: float = 0.0
    daily_blocked: bool = False
    loss_streak: int = 0
    cooldown_until: int = 0
    halted: bool = False
    n_closed: int = 0
    ring_win: list[float] = field(default_factory=lambda: [0.0] * RING)
    ring_eq: list[float] = field(default_factory=lambda: [0.0] * RING)
    skipped_size: int = 0
    last_bar: int = -1
    # open position (side 0 = flat)
    side: int = 0
    size: float = 0.0
    entry_price: float = 0.0
    stop: float = 0.0
    target: float = 0.0
    sl_dist: float = 0.0
    entry_bar: int = -1
    entry_time_ns: int = 0
    risk_mult: float = 1.0
    pending_exit: int = 0
    # order decided at the last close, to be filled at the next open
    pending_side: int = 0
    pending_size: float = 0.0
    pending_sl_dist: float = 0.0
    pending_tp_dist: float = 0.0
    pending_risk_mult: float = 1.0

    VERSION = 1

    @classmethod
    def initial(cls, equity: float) -> State:
        return cls(equity=float(equity), peak=float(equity), day_start_equity=float(equity))

    def account(self) -> Account:
        """The :class:`Account` part of this state (typed as the kernel's)."""
        return Account(float(self.equity), float(self.peak), int(self.day), float(self.day_start_equity),
                       bool(self.daily_blocked), int(self.loss_streak), int(self.cooldown_until), bool(self.halted),
                       int(self.n_closed))

    def set_account(self, acc: Account) -> None:
        """Store an :class:`Account` back into this state."""
        self.equity, self.peak, self.day = float(acc.equity), float(acc.peak), int(acc.day)
        self.day_start_equity, self.daily_blocked = float(acc.day_start_equity), bool(acc.daily_blocked)
        self.loss_streak, self.cooldown_until = int(acc.loss_streak), int(acc.cooldown_until)
        self.halted, self.n_closed = bool(acc.halted), int(acc.n_closed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = self.VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> State:
        d = dict(d)
        if d.pop("version", None) != cls.VERSION:
            raise ValueError("trading state: unknown version")
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise ValueError(f"trading state: keys differ from the schema: {sorted(set(d) ^ names)}")
        types = {f.name: f.type for f in fields(cls)}
        out: dict[str, Any] = {}
        for k, v in d.items():
            t = str(types[k])
            if t == "float":
                out[k] = float(v)
            elif t == "int":
                out[k] = int(v)
            elif t == "bool":
                out[k] = bool(v)
            else:
                out[k] = [float(x) for x in v]
        return cls(**out)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> State:
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------------------------- numba cache
def _purge_stale_numba_cache() -> None:
    """Drop cached machine code of this package when trees.py, policy.py, metrics.py or nb.py changed (the kernel in
    nb.py and the functions here inline code from policy.py and trees.py, the kernel also the drawdown step of
    metrics.py; see :mod:`backtest.numba_cache`)."""
    here = Path(__file__).resolve().parent
    purge_stale_cache(session_code, [here / n for n in ("trees.py", "policy.py", "metrics.py", "nb.py")],
                      ("nb.", "policy.", "trees.", "metrics."), "backtest_numba_deps.sha")


_purge_stale_numba_cache()
