"""Two ways to run one trading logic: ``run_step`` (the reference) and ``run_fast`` / ``run_arrays`` (the workhorse).

* :func:`run_step` drives :class:`backtest.live.Trader` bar by bar exactly as the live bot does: features from a
  bounded history window, the predictor called on one row, the policy applied to an explicit State.
* :func:`run_fast` computes the features and every *state-independent* prediction once for all bars
  (:func:`prepare_arrays`), then runs the compiled kernel (``backtest/nb.py``). State-dependent models (position and
  risk) are compiled trees evaluated inside the kernel, never per-bar Python calls.
* :func:`run_arrays` is the hot path for the sweep, Optuna objectives and risk labels: it reuses a prepared
  :class:`MarketArrays` (cached predictions, preallocated output buffers, memoised position paths) and only takes new
  scalar :class:`~backtest.policy.Params`. One call costs the kernel plus a few tens of microseconds.

Both modes return a :class:`BacktestResult` with the same trade table, equity curve, breaker trips and metrics.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from backtest import metrics as _metrics
from backtest import nb as _nb
from backtest.live import Trader
from backtest.nb import KernelInputs, KernelOut, PathMemo, new_memo, new_out, run_kernel
from backtest.policy import (
    EXIT_REASONS,
    TRIP_REASONS,
    VOL_REGIME_BARS,
    Account,
    Params,
    State,
    decision_clock,
    make_params,
    vol_regime_series,
)
from backtest.predictor import Predictor, predictor_name
from backtest.stats import day_ends
from backtest.trees import CompiledTrees, empty_trees
from core.config import Config
from core.errors import UserError

CANDLE_COLUMNS = ("open", "high", "low", "close", "spread")
TRADE_COLUMNS = ["entry_bar", "exit_bar", "entry_time", "exit_time", "side", "size", "entry_price", "exit_price",
                 "stop", "target", "pnl", "r_multiple", "exit_reason", "risk_mult"]
_PATH_CACHE_SIZE = 32


@dataclass
class BacktestResult:
    """One backtest: trades, equity at each bar's close, breaker trips, skipped orders, metrics."""

    trades: pd.DataFrame
    equity: pd.Series
    trips: list[dict[str, Any]]
    skipped_size: int
    metrics: dict[str, Any]
    in_sample: bool
    mode: str
    predictor: str
    params: Params

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (metrics, window, flags)."""
        return {
            "mode": self.mode, "predictor": self.predictor, "in_sample": self.in_sample,
            "window": {"start": str(self.equity.index[0]), "end": str(self.equity.index[-1]),
                       "bars": int(self.equity.size)},
            "metrics": self.metrics, "skipped_size": self.skipped_size, "trips": self.trips,
            "params": self.params._asdict(),
        }


# --------------------------------------------------------------------------------------------------- windows
def resolve_window(index: pd.DatetimeIndex, start: Any = None, end: Any = None) -> tuple[int, int]:
    """Bar positions ``[s, e)`` from ints (positions), timestamps/strings (``start`` inclusive, ``end`` exclusive)
    or None (data start / end). An empty window is a :class:`UserError`."""

    def pos(x: Any, default: int) -> int:
        if x is None:
            return default
        if isinstance(x, (int, np.integer)):
            return int(x) if x >= 0 else len(index) + int(x)
        ts = pd.Timestamp(x)
        if ts.tzinfo is None:
            ts = ts.tz_localize("UTC")
        return int(index.searchsorted(ts, side="left"))

    s, e = max(pos(start, 0), 0), min(pos(end, len(index)), len(index))
    if e - s < 2:
        raise UserError(f"empty backtest window: {start} .. {end} holds {max(e - s, 0)} bars of "
                        f"{len(index)} (need at least 2)")
    return s, e


def _gap_positions(index: pd.DatetimeIndex, max_gap_minutes: int) -> np.ndarray:
    """Positions ``i`` where the step from bar ``i - 1`` to bar ``i`` exceeds ``max_gap_minutes``."""
    ns = index.as_unit("ns").asi8
    d = np.diff(ns)
    return np.flatnonzero(d > max_gap_minutes * 60 * 1_000_000_000) + 1


def check_window_gaps(index: pd.DatetimeIndex, gaps: np.ndarray, s: int, e: int, max_gap_minutes: int) -> None:
    """A gap longer than the config's ``data.max_gap_minutes`` inside the window is bad input (UserError)."""
    inside = gaps[(gaps > s) & (gaps < e)]
    if inside.size:
        i = int(inside[0])
        raise UserError(f"candles have a {int((index[i] - index[i - 1]).total_seconds() // 60)}-minute gap inside "
                        f"the backtest window ({index[i - 1]} -> {index[i]}; data.max_gap_minutes = "
                        f"{max_gap_minutes})")


def _check_candles(candles: pd.DataFrame) -> None:
    missing = [c for c in CANDLE_COLUMNS if c not in candles.columns]
    if missing:
        raise UserError(f"candles lack columns {missing}")
    if not isinstance(candles.index, pd.DatetimeIndex) or candles.index.tz is None:
        raise UserError("candles need a tz-aware UTC DatetimeIndex")
    if len(candles) and not candles.index.is_monotonic_increasing:
        raise UserError("candles are not sorted by time")


# ----------------------------------------------------------------------------------------------- fast mode
@dataclass
class MarketArrays:
    """Everything state-independent for one candle set and one predictor, as contiguous arrays (prepared once)."""

    index: pd.DatetimeIndex
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    spread: np.ndarray
    hour: np.ndarray
    day: np.ndarray
    atr: np.ndarray
    p_long: np.ndarray
    p_short: np.ndarray
    sl_atr: np.ndarray
    tp_atr: np.ndarray
    use_sltp: bool
    exit_X: np.ndarray
    exit_trees: CompiledTrees
    use_exit: bool
    vol_regime: np.ndarray
    risk_trees: CompiledTrees
    use_risk: bool
    max_gap_minutes: int = 120
    predictor: str = ""
    gaps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    _paths: OrderedDict[tuple[Any, ...], PathMemo] = field(default_factory=OrderedDict, repr=False)
    _ws: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return int(self.open.size)

    def workspace(self) -> KernelOut:
        """Output buffers of the kernel, allocated once per MarketArrays. The kernel releases the GIL: threads that
        run at the same time need their own (:meth:`fork`); :func:`run_arrays` copies results out."""
        if "out" not in self._ws:
            self._ws["out"] = new_out(self.n, int(self.exit_X.shape[1]))
        return self._ws["out"]

    def kernel_inputs(self) -> KernelInputs:
        """The kernel's :class:`~backtest.nb.KernelInputs` view of these arrays. ``p_max`` is cached for the
        probability arrays it was made from (callers swap ``p_long`` / ``p_short`` with ``dataclasses.replace``)."""
        got = self._ws.get("p_max")
        if got is None or got[0] is not self.p_long or got[1] is not self.p_short:
            got = (self.p_long, self.p_short, np.maximum(self.p_long, self.p_short))
            self._ws["p_max"] = got
        return KernelInputs(self.open, self.high, self.low, self.close, self.spread, self.hour, self.day, self.atr,
                            self.p_long, self.p_short, got[2], self.sl_atr, self.tp_atr, self.exit_X,
                            self.vol_regime, self.exit_trees, self.risk_trees, bool(self.use_sltp),
                            bool(self.use_exit), bool(self.use_risk))

    @staticmethod
    def path_key(p: Params, end: int, close_at_end: bool = True) -> tuple[Any, ...]:
        """What a memoised position path depends on (see ``backtest/nb.py``): runs with equal keys share paths."""
        return (p.sl_multiplier, p.tp_multiplier, p.exit_threshold, p.max_holding_bars, p.fixed_sl_atr,
                p.fixed_tp_atr, p.slippage_points, p.point, end, close_at_end)

    def paths(self, p: Params, end: int, close_at_end: bool = True) -> PathMemo:
        """Memoised position paths valid for ``p`` (see ``backtest/nb.py``), LRU-bounded."""
        key = self.path_key(p, end, close_at_end)
        got = self._paths.get(key)
        if got is None:
            got = new_memo(self.n)
            self._paths[key] = got
            while len(self._paths) > _PATH_CACHE_SIZE:
                self._paths.popitem(last=False)
        else:
            self._paths.move_to_end(key)
        return got

    def day_ends(self, start: int, end: int) -> np.ndarray:
        """Positions in ``[start, end)`` (from ``start``) of every UTC day's last bar, cached per window: the same
        for every run on it (:func:`backtest.stats.day_ends`)."""
        key = ("ends", start, end)
        got = self._ws.get(key)
        if got is None:
            got = self._ws[key] = day_ends(self.day[start:end])
        return got

    def clear_paths(self) -> None:
        self._paths.clear()

    def fork(self) -> MarketArrays:
        """The same (shared, read-only) market arrays with their own output buffers and path memo: what a second
        thread needs to run the kernel at the same time (the kernel releases the GIL; two runs must not share
        buffers, nor the trees' scratch row of cells)."""
        own = lambda t: t._replace(t_cells=np.zeros_like(t.t_cells))  # noqa: E731
        return replace(self, exit_trees=own(self.exit_trees), risk_trees=own(self.risk_trees), _paths=OrderedDict(),
                       _ws={})

    def window(self, start: Any = None, end: Any = None) -> tuple[int, int]:
        """Resolve and validate a window (empty window / gaps inside -> UserError)."""
        s, e = resolve_window(self.index, start, end)
        check_window_gaps(self.index, self.gaps, s, e, self.max_gap_minutes)
        return s, e


def prepare_arrays(candles: pd.DataFrame, features: pd.DataFrame | None, predictor: Predictor,
                   cfg: Config) -> MarketArrays:
    """Compute once, for all bars: features (if not given), the signal probabilities, SL/TP distances, the exit
    model's market columns, ATR and the vol regime. This is the one-off cost the benchmark reports separately."""
    _check_candles(candles)
    names = list(predictor.feature_names)
    if features is None:
        from market.features import build_features

        features = build_features(candles, cfg)
    if len(features) != len(candles) or not features.index.equals(candles.index):
        raise UserError("features do not line up with the candles (different index)")
    missing = [c for c in names if c not in features.columns]
    if missing:
        raise UserError(f"the predictor expects feature columns the feature code does not produce: {missing}")
    if "atr" not in features.columns:
        raise UserError("features lack the 'atr' column")
    F = features[names].to_numpy(np.float32)
    n = len(candles)
    proba = np.asarray(predictor.signal_proba(F), dtype=np.float64)
    if proba.shape != (n, 2):
        raise ValueError(f"signal_proba returned shape {proba.shape}, expected ({n}, 2)")
    sltp = predictor.sltp(F)
    use_sltp = sltp is not None
    if use_sltp:
        sltp = np.asarray(sltp, dtype=np.float64)
        if sltp.shape != (n, 2):
            raise ValueError(f"sltp returned shape {sltp.shape}, expected ({n}, 2)")
        sl_atr, tp_atr = np.ascontiguousarray(sltp[:, 0]), np.ascontiguousarray(sltp[:, 1])
    else:
        sl_atr = tp_atr = np.full(n, np.nan)
    em = predictor.exit_model
    if em is not None:
        exit_trees, cols = em[0], np.asarray(em[1], dtype=np.int64)
        exit_X = np.ascontiguousarray(F[:, cols], dtype=np.float64)
    else:
        exit_trees, exit_X = empty_trees(), np.zeros((n, 0), dtype=np.float64)
    rm = predictor.risk_model
    atr = features["atr"].to_numpy(np.float32).astype(np.float64)
    hour, day = decision_clock(candles.index.as_unit("ns").asi8)
    # writable copies: read-only arrays would make numba compile (and cache) a second kernel signature
    col = lambda name: np.array(candles[name].to_numpy(np.float64), copy=True)  # noqa: E731
    return MarketArrays(
        index=candles.index, open=col("open"), high=col("high"), low=col("low"), close=col("close"),
        spread=col("spread"), hour=np.ascontiguousarray(hour), day=np.ascontiguousarray(day), atr=atr,
        p_long=np.ascontiguousarray(proba[:, 0]), p_short=np.ascontiguousarray(proba[:, 1]), sl_atr=sl_atr,
        tp_atr=tp_atr, use_sltp=use_sltp, exit_X=exit_X, exit_trees=exit_trees, use_exit=em is not None,
        vol_regime=vol_regime_series(atr, VOL_REGIME_BARS), risk_trees=rm if rm is not None else empty_trees(),
        use_risk=rm is not None, max_gap_minutes=cfg.data.max_gap_minutes, predictor=predictor_name(predictor),
        gaps=_gap_positions(candles.index, cfg.data.max_gap_minutes),
    )


@dataclass
class FastRun:
    """Raw output of :func:`run_arrays` (copied out of the shared buffers): cheap to make, cheap to score."""

    start: int
    end: int
    params: Params
    trades: dict[str, np.ndarray]
    equity: np.ndarray  # marked equity at the close of bars start..end-1
    trip_bar: np.ndarray
    trip_code: np.ndarray
    skipped_size: int
    final_state: State | None = None  # the trading state after bar end - 1 (continue a run from it)
    max_drawdown: float | None = None  # the kernel's measurement of the equity's max drawdown (a fraction)

    @property
    def n_trades(self) -> int:
        return int(self.trades["pnl"].size)

    def metrics(self, arrays: MarketArrays, min_trades: int = 30) -> dict[str, Any]:
        return _metrics.compute_metrics(
            self.equity, arrays.day[self.start:self.end], self.trades["pnl"], self.trades["r"],
            self.trades["entry"], self.trades["exit"], self.params.initial_equity, int(self.trip_bar.size),
            min_trades, max_drawdown=self.max_drawdown, ends=arrays.day_ends(self.start, self.end))

    def to_result(self, arrays: MarketArrays, *, min_trades: int = 30, in_sample: bool = True,
                  mode: str = "fast") -> BacktestResult:
        idx = arrays.index
        tr = self.trades
        trades = pd.DataFrame({
            "entry_bar": tr["entry"], "exit_bar": tr["exit"], "entry_time": idx[tr["entry"]],
            "exit_time": idx[tr["exit"]], "side": tr["side"], "size": tr["size"], "entry_price": tr["entry_px"],
            "exit_price": tr["exit_px"], "stop": tr["stop"], "target": tr["target"], "pnl": tr["pnl"],
            "r_multiple": tr["r"], "exit_reason": [EXIT_REASONS[int(c)] for c in tr["reason"]],
            "risk_mult": tr["mult"],
        }, columns=TRADE_COLUMNS)
        equity = pd.Series(self.equity, index=idx[self.start:self.end], name="equity")
        trips = [{"bar": int(b), "time": str(idx[int(b)]), "reason": TRIP_REASONS[int(c)]}
                 for b, c in zip(self.trip_bar, self.trip_code, strict=True)]
        return BacktestResult(trades=trades, equity=equity, trips=trips, skipped_size=self.skipped_size,
                              metrics=self.metrics(arrays, min_trades), in_sample=in_sample, mode=mode,
                              predictor=arrays.predictor, params=self.params)


def state_to_carry(state: State) -> np.ndarray:
    """The open position and pending order of a :class:`State` as the kernel's carry vector (``backtest.nb.C_*``;
    the account and the rings travel separately)."""
    c = _nb.flat_carry()
    c[_nb.C_SIDE], c[_nb.C_SIZE], c[_nb.C_ENTRY], c[_nb.C_STOP] = (state.side, state.size, state.entry_price,
                                                                   state.stop)
    c[_nb.C_TARGET], c[_nb.C_SL_DIST], c[_nb.C_ENTRY_BAR] = state.target, state.sl_dist, state.entry_bar
    c[_nb.C_MULT], c[_nb.C_PENDING_EXIT] = state.risk_mult, state.pending_exit
    c[_nb.C_PEND_SIDE], c[_nb.C_PEND_SIZE], c[_nb.C_PEND_SL] = (state.pending_side, state.pending_size,
                                                                state.pending_sl_dist)
    c[_nb.C_PEND_TP], c[_nb.C_PEND_MULT] = state.pending_tp_dist, state.pending_risk_mult
    return c


def carry_to_state(acc: Account, ring_win: np.ndarray, ring_eq: np.ndarray, c: np.ndarray, *, skipped_size: int,
                   last_bar: int, entry_time_ns: int) -> State:
    """The kernel's final account, rings and carry vector back as a :class:`State` (the counters the kernel does
    not carry are passed in)."""
    st = State(equity=0.0, peak=0.0, ring_win=[float(x) for x in ring_win], ring_eq=[float(x) for x in ring_eq],
               skipped_size=int(skipped_size), last_bar=int(last_bar), side=int(c[_nb.C_SIDE]),
               size=float(c[_nb.C_SIZE]), entry_price=float(c[_nb.C_ENTRY]), stop=float(c[_nb.C_STOP]),
               target=float(c[_nb.C_TARGET]), sl_dist=float(c[_nb.C_SL_DIST]), entry_bar=int(c[_nb.C_ENTRY_BAR]),
               entry_time_ns=int(entry_time_ns), risk_mult=float(c[_nb.C_MULT]),
               pending_exit=int(c[_nb.C_PENDING_EXIT]), pending_side=int(c[_nb.C_PEND_SIDE]),
               pending_size=float(c[_nb.C_PEND_SIZE]), pending_sl_dist=float(c[_nb.C_PEND_SL]),
               pending_tp_dist=float(c[_nb.C_PEND_TP]), pending_risk_mult=float(c[_nb.C_PEND_MULT]))
    st.set_account(acc)
    return st


def run_arrays(arrays: MarketArrays, params: Params, start: int = 0, end: int | None = None, *,
               memo_paths: bool = True, check: bool = True, copy: bool = True, state: State | None = None,
               close_at_end: bool = True) -> FastRun:
    """Run the compiled kernel on bar positions ``[start, end)`` of prepared arrays with scalar ``params``.

    ``memo_paths`` reuses the position paths of earlier runs with the same path-relevant params (``nb.py``);
    ``check=False`` skips the window validation (callers that validated the window once); ``copy=False`` returns
    views into the shared output buffers (valid only until the next run on the same ``arrays``: score it first).

    ``state`` starts the run from a saved trading state (equity, peak, breakers, streaks, an open position or an
    order pending at the next open; its bar numbers are positions in ``arrays``) instead of a fresh account, and
    ``close_at_end=False`` leaves the last bar as a live bot would (no forced close, a decision at its close):
    ``run.final_state`` then continues the run, so consecutive windows chained this way equal one long run (the
    walk-forward replay scores each week of the deployed set like this)."""
    if end is None:
        end = arrays.n
    if check:
        start, end = arrays.window(int(start), int(end))
    st = state if state is not None else State.initial(params.initial_equity)
    if st.side != 0 and not 0 <= st.entry_bar < start:
        raise ValueError(f"state: open position entered at bar {st.entry_bar}, not before the window start {start}")
    out = arrays.workspace()
    memo = arrays.paths(params, end, close_at_end) if memo_paths else new_memo(arrays.n)
    ring_win = np.array(st.ring_win, dtype=np.float64)
    ring_eq = np.array(st.ring_eq, dtype=np.float64)
    carry = state_to_carry(st)
    n_tr, n_trips, skipped, acc = run_kernel(arrays.kernel_inputs(), params, start, end, st.account(), ring_win,
                                             ring_eq, memo, out, carry, bool(close_at_end))
    cp = (lambda a: a.copy()) if copy else (lambda a: a)  # noqa: E731
    rec = out.trades[:n_tr]
    trades = {name: cp(rec[name]) for name in rec.dtype.names}
    trips = out.trips[:n_trips]
    e_bar = int(carry[_nb.C_ENTRY_BAR])
    entry_ns = (st.entry_time_ns if e_bar == st.entry_bar and st.side != 0
                else int(arrays.index[e_bar].value) if e_bar >= 0 else 0)
    final = carry_to_state(acc, ring_win, ring_eq, carry, skipped_size=st.skipped_size + int(skipped),
                           last_bar=end - 1, entry_time_ns=entry_ns)
    return FastRun(start=start, end=end, params=params, trades=trades, equity=cp(out.equity[start:end]),
                   trip_bar=cp(trips["bar"]), trip_code=cp(trips["code"]), skipped_size=int(skipped),
                   final_state=final, max_drawdown=float(out.drawdown[0]))


def run_fast(candles: pd.DataFrame, features: pd.DataFrame | None, predictor: Predictor, cfg: Config,
             start: Any = None, end: Any = None, *, params: Params | None = None, in_sample: bool = True,
             arrays: MarketArrays | None = None) -> BacktestResult:
    """Fast mode over the window ``[start, end)`` (positions, timestamps or None). Bars before ``start`` serve
    only as feature history. ``in_sample`` is the caller's statement about the window (reports show it)."""
    arrays = arrays if arrays is not None else prepare_arrays(candles, features, predictor, cfg)
    s, e = arrays.window(start, end)
    p = params if params is not None else make_params(cfg)
    run = run_arrays(arrays, p, s, e, check=False)
    return run.to_result(arrays, min_trades=cfg.profile.min_trades, in_sample=in_sample)


# ----------------------------------------------------------------------------------------------- step mode
def run_step(candles: pd.DataFrame, predictor: Predictor, cfg: Config, start: Any = None, end: Any = None, *,
             params: Params | None = None, in_sample: bool = True, trader: Trader | None = None) -> BacktestResult:
    """The reference: the live Trader, one bar at a time, features from the bounded history window only."""
    _check_candles(candles)
    idx = candles.index
    s, e = resolve_window(idx, start, end)
    check_window_gaps(idx, _gap_positions(idx, cfg.data.max_gap_minutes), s, e, cfg.data.max_gap_minutes)
    from backtest.live import HISTORY_BARS

    tr = trader if trader is not None else Trader(cfg, predictor, params=params)
    equity = np.empty(e - s)
    records = []
    trip_bar: list[int] = []
    trip_code: list[int] = []
    for t in range(s, e):
        rep = tr.step(candles.iloc[max(0, t - HISTORY_BARS + 1):t + 1], bar=t, is_last=t == e - 1)
        equity[t - s] = rep.equity
        if rep.closed is not None:
            records.append(rep.closed)
            for c in rep.trips:
                trip_bar.append(t)
                trip_code.append(c)
    run = _fast_run_from_records(records, s, e, tr, equity, trip_bar, trip_code)
    _, day = decision_clock(idx.as_unit("ns").asi8)
    shim = _IndexShim(index=idx, day=day, predictor=predictor_name(predictor))
    return run.to_result(shim, min_trades=cfg.profile.min_trades, in_sample=in_sample, mode="step")  # type: ignore


def run_replay(arrays: MarketArrays, params: Params, start: int = 0, end: int | None = None, *,
               trader: Trader | None = None, close_at_end: bool = True) -> tuple[FastRun, Trader]:
    """Drive the live :class:`Trader` bar by bar over *precomputed* inputs (no feature recomputation).

    Why: it isolates the rules from the feature code. The kernel and the Trader must agree here on any data (tests
    run it on all bars in seconds); the full :func:`run_step` adds the bounded-window features on top. Pass a
    ``trader`` (e.g. restored from a saved State) to continue a run from bar ``start``; ``close_at_end=False``
    stops after bar ``end - 1`` as a live bot would (no forced close, a decision at its close)."""
    end = arrays.n if end is None else end
    em = (arrays.exit_trees, np.arange(arrays.exit_X.shape[1])) if arrays.use_exit else None
    tr = trader if trader is not None else Trader(None, None, params=params, exit_model=em,
                                                  risk_model=arrays.risk_trees if arrays.use_risk else None)
    equity = np.empty(end - start)
    recs = []
    trip_bar: list[int] = []
    trip_code: list[int] = []
    t_ns = arrays.index.as_unit("ns").asi8
    for t in range(start, end):
        rep = tr.on_bar(t, int(t_ns[t]), arrays.open[t], arrays.high[t], arrays.low[t], arrays.close[t],
                        arrays.spread[t], p_long=arrays.p_long[t], p_short=arrays.p_short[t],
                        sl_atr=arrays.sl_atr[t], tp_atr=arrays.tp_atr[t], use_sltp=arrays.use_sltp,
                        atr=arrays.atr[t], exit_market_row=arrays.exit_X[t], vol_regime=arrays.vol_regime[t],
                        is_last=close_at_end and t == end - 1)
        equity[t - start] = rep.equity
        if rep.closed is not None:
            recs.append(rep.closed)
            trip_bar.extend([t] * len(rep.trips))
            trip_code.extend(rep.trips)
    return _fast_run_from_records(recs, start, end, tr, equity, trip_bar, trip_code), tr


def _fast_run_from_records(records: list[Any], s: int, e: int, tr: Trader, equity: np.ndarray, trip_bar: list[int],
                           trip_code: list[int]) -> FastRun:
    get = lambda name, dt: np.asarray([getattr(r, name) for r in records], dtype=dt)  # noqa: E731
    inv = {v: k for k, v in EXIT_REASONS.items()}
    trades = {
        "entry": get("entry_bar", np.int64), "exit": get("exit_bar", np.int64), "side": get("side", np.int64),
        "size": get("size", np.float64), "entry_px": get("entry_price", np.float64),
        "exit_px": get("exit_price", np.float64), "stop": get("stop", np.float64),
        "target": get("target", np.float64), "pnl": get("pnl", np.float64), "r": get("r_multiple", np.float64),
        "reason": np.asarray([inv[r.exit_reason] for r in records], dtype=np.int64),
        "mult": get("risk_mult", np.float64),
    }
    return FastRun(start=s, end=e, params=tr.params, trades=trades, equity=equity,
                   trip_bar=np.asarray(trip_bar, dtype=np.int64), trip_code=np.asarray(trip_code, dtype=np.int64),
                   skipped_size=tr.state.skipped_size)


@dataclass
class _IndexShim:
    """What :meth:`FastRun.to_result` reads of a MarketArrays (index, day, predictor, day ends): step mode."""

    index: pd.DatetimeIndex
    day: np.ndarray
    predictor: str

    def day_ends(self, start: int, end: int) -> np.ndarray:
        return day_ends(self.day[start:end])
