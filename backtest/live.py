"""The Trader: the trading loop the live bot runs, bar by bar; the step-mode backtest drives the very same object.

At each bar close the Trader (1) computes the last row of the features from a bounded window of history with
``market.features.last_row`` (the formulas of ``build_features``, last row only), (2) calls the predictor on that
one row, and (3) applies the rules of :mod:`backtest.policy` to its :class:`~backtest.policy.State`. The rules are
the compiled functions the fast kernel calls, so the live loop, the step backtest and the fast backtest cannot
disagree about a rule; the parity test checks that they agree trade for trade.

Simulated fills: in a backtest the Trader also simulates the broker (fills at the next open with costs, stops and
targets on high/low, rules R5, R9-R11). A live bot reconciles those events with the broker's reports instead, but
takes its *decisions* (orders, sizes, exits, breakers) from the same :meth:`Trader.on_bar`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from backtest.policy import (
    EXIT_REASONS,
    FLAT,
    GATE_OK,
    GATE_SIZE,
    N_ACC,
    N_POS,
    TRIP_CODES,
    VOL_REGIME_BARS,
    Params,
    State,
    book_exit,
    day_rollover,
    decision_clock,
    entry_fill,
    make_params,
    manage_bar,
    mark_equity,
    model_exit,
    plan_entry,
    stops_from_fill,
    time_exit,
    trip_bit,
    vol_regime_at,
)
from backtest.predictor import Predictor
from backtest.trees import CompiledTrees, empty_trees
from core.config import Config
from market.features import WARMUP_BARS, feature_names, last_row

HISTORY_BARS = WARMUP_BARS + VOL_REGIME_BARS + 16  # features' warm-up + the vol-regime median + margin


@dataclass
class TradeRecord:
    """One closed trade (bars are the driver's bar numbers; times are bar open times in ns since the epoch)."""

    entry_bar: int
    exit_bar: int
    entry_time_ns: int
    exit_time_ns: int
    side: int
    size: float
    entry_price: float
    exit_price: float
    stop: float
    target: float
    pnl: float
    r_multiple: float
    exit_reason: str
    risk_mult: float


@dataclass
class BarReport:
    """What happened on one bar: fills, the closed trade, breaker trips, the decision, the marked equity."""

    bar: int
    equity: float
    filled: bool = False
    closed: TradeRecord | None = None
    trips: list[int] = field(default_factory=list)
    gate: int = -1  # GATE_* of the entry decision at this close, -1 when none was taken (in position / last bar)
    order_side: int = 0
    order_size: float = 0.0
    pending_exit: int = 0


class Trader:
    """Stateful bar-by-bar trading loop around :class:`State` (save ``trader.state.to_dict()`` after each bar)."""

    def __init__(self, cfg: Config | None, predictor: Predictor | None, *, params: Params | None = None,
                 state: State | None = None, exit_model: tuple[CompiledTrees, np.ndarray] | None = None,
                 risk_model: CompiledTrees | None = None) -> None:
        """``predictor`` supplies the feature list and the exit/risk models; without one (replaying precomputed
        inputs through :meth:`on_bar`) pass ``params`` and optionally ``exit_model`` / ``risk_model``."""
        if params is None:
            if cfg is None:
                raise ValueError("Trader needs a config or params")
            params = make_params(cfg)
        self.cfg = cfg
        self.predictor = predictor
        self.params = params
        self.state = state if state is not None else State.initial(self.params.initial_equity)
        if predictor is not None:
            self.names = list(predictor.feature_names)
            all_names = feature_names(cfg)
            missing = [n for n in self.names if n not in all_names]
            if missing:
                raise ValueError(f"the predictor expects feature columns the feature code does not produce: {missing}")
            # positions of the predictor's columns in last_row()'s full row (same order in practice)
            self._cols = np.array([all_names.index(n) for n in self.names], dtype=np.int64)
            exit_model, risk_model = predictor.exit_model, predictor.risk_model
        self.use_exit = exit_model is not None
        self.exit_trees: CompiledTrees = exit_model[0] if exit_model is not None else empty_trees()
        self.exit_cols = (np.asarray(exit_model[1], dtype=np.int64) if exit_model is not None
                          else np.zeros(0, dtype=np.int64))
        self.use_risk = risk_model is not None
        self.risk_trees: CompiledTrees = risk_model if risk_model is not None else empty_trees()
        self._xbuf = np.empty(N_POS + self.exit_cols.size)
        self._abuf = np.empty(N_ACC)
        self._no_market = np.zeros(0)

    # ------------------------------------------------------------------------------------------- live entry point
    def step(self, history: pd.DataFrame, bar: int, is_last: bool = False) -> BarReport:
        """Process the bar that just closed: ``history`` ends with it (standard candle frame); only its last
        :data:`HISTORY_BARS` rows are used, exactly as the live bot does. The features come from
        :func:`market.features.last_row` (the last row only, equal to ``build_features`` on the window)."""
        if self.predictor is None:
            raise ValueError("Trader.step needs a predictor")
        hist = history.iloc[-HISTORY_BARS:]
        row, atr_hist = last_row(hist, self.cfg, atr_tail=VOL_REGIME_BARS)
        last = hist.iloc[-1]
        return self.step_row(bar, int(hist.index[-1].value), float(last["open"]), float(last["high"]),
                             float(last["low"]), float(last["close"]), float(last["spread"]), row, atr_hist,
                             is_last=is_last)

    def predict_row(self, row: np.ndarray) -> dict[str, float | bool]:
        """The state-independent model outputs for one feature row (``feature_names`` order, float32)."""
        if self.predictor is None:
            raise ValueError("Trader.predict_row needs a predictor")
        X = np.asarray(row, dtype=np.float32)[self._cols].reshape(1, -1)
        proba = np.asarray(self.predictor.signal_proba(X), dtype=np.float64)
        sltp = self.predictor.sltp(X)
        use_sltp = sltp is not None
        return {"p_long": float(proba[0, 0]), "p_short": float(proba[0, 1]), "use_sltp": use_sltp,
                "sl_atr": float(sltp[0, 0]) if use_sltp else np.nan,
                "tp_atr": float(sltp[0, 1]) if use_sltp else np.nan}

    def step_row(self, bar: int, time_ns: int, o: float, h: float, lo: float, c: float, spread: float,
                 row: np.ndarray, atr_hist: np.ndarray, *, is_last: bool = False,
                 pred: dict[str, float | bool] | None = None) -> BarReport:
        """One closed bar from its feature ``row`` and the ATR of the last :data:`VOL_REGIME_BARS` bars (both as
        :func:`market.features.last_row` returns them): predictor, then :meth:`on_bar`."""
        pred = pred if pred is not None else self.predict_row(row)
        atr = np.asarray(atr_hist, dtype=np.float32).astype(np.float64)
        x = np.asarray(row, dtype=np.float32)[self._cols] if self.predictor is not None else np.asarray(row)
        return self.on_bar(
            bar, int(time_ns), float(o), float(h), float(lo), float(c), float(spread), p_long=float(pred["p_long"]),
            p_short=float(pred["p_short"]), sl_atr=float(pred["sl_atr"]), tp_atr=float(pred["tp_atr"]),
            use_sltp=bool(pred["use_sltp"]), atr=float(atr[-1]), exit_market_row=x[self.exit_cols].astype(np.float64),
            vol_regime=float(vol_regime_at(atr, atr.size - 1, VOL_REGIME_BARS)), is_last=is_last,
        )

    # ------------------------------------------------------------------------------------ rules on one bar's inputs
    def on_bar(self, bar: int, time_ns: int, o: float, h: float, lo: float, c: float, spread: float, *,
               p_long: float, p_short: float, sl_atr: float, tp_atr: float, use_sltp: bool, atr: float,
               exit_market_row: np.ndarray | None, vol_regime: float, is_last: bool = False) -> BarReport:
        """Apply the policy to one closed bar, in the kernel's order (``backtest/nb.py``): day rollover, pending
        entry fill at the open, position management (R9-R13), equity mark, decision at the close."""
        s = self.state
        p = self.params
        hour_a, day_a = decision_clock(time_ns)
        hour, day = int(hour_a), int(day_a)
        rep = BarReport(bar=bar, equity=s.equity)
        s.set_account(day_rollover(day, s.account()))
        if s.pending_side != FLAT:
            s.side = s.pending_side
            s.size = s.pending_size
            s.sl_dist = s.pending_sl_dist
            s.entry_price = entry_fill(o, s.side, spread, p)
            s.stop, s.target = stops_from_fill(s.entry_price, s.side, s.pending_sl_dist, s.pending_tp_dist)
            s.risk_mult = s.pending_risk_mult
            s.entry_bar = bar
            s.entry_time_ns = int(time_ns)
            s.pending_exit = 0
            s.pending_side = FLAT
            rep.filled = True
        market = exit_market_row if (self.use_exit and exit_market_row is not None) else self._no_market
        if s.side != FLAT:
            reason, px = manage_bar(s.pending_exit, s.side, s.stop, s.target, o, h, lo, c, spread, is_last, p)
            if reason != 0:
                rec, trips = self._close(bar, int(time_ns), px, reason)
                rep.closed = rec
                rep.trips = trips
            else:
                pend = time_exit(bar, s.entry_bar, p)
                if pend == 0 and self.use_exit:
                    pend = model_exit(bar, s.entry_bar, s.side, c, s.entry_price, s.stop, s.target, atr, market,
                                      self._xbuf, self.exit_trees, p)
                s.pending_exit = int(pend)
                rep.pending_exit = int(pend)
        rep.equity = float(mark_equity(s.equity, s.side, s.entry_price, c, s.size, p))
        if s.side == FLAT and not is_last:
            side, code, sl_d, tp_d, mult, size = plan_entry(
                bar, p_long, p_short, hour, spread, atr, sl_atr, tp_atr, use_sltp, vol_regime, s.equity, s.peak,
                s.loss_streak, np.asarray(s.ring_win), np.asarray(s.ring_eq), s.n_closed, s.halted, s.daily_blocked,
                s.cooldown_until, self.risk_trees, self.use_risk, self._abuf, p)
            rep.gate = int(code)
            if side != FLAT and code == GATE_OK:
                s.pending_side = int(side)
                s.pending_size = float(size)
                s.pending_sl_dist = float(sl_d)
                s.pending_tp_dist = float(tp_d)
                s.pending_risk_mult = float(mult)
                rep.order_side = int(side)
                rep.order_size = float(size)
            elif code == GATE_SIZE:
                s.skipped_size += 1
        s.last_bar = bar
        return rep

    def _close(self, bar: int, time_ns: int, exit_price: float, reason: int) -> tuple[TradeRecord, list[int]]:
        s = self.state
        ring_win = np.asarray(s.ring_win, dtype=np.float64)
        ring_eq = np.asarray(s.ring_eq, dtype=np.float64)
        booked, acc = book_exit(bar, s.side, s.entry_price, exit_price, s.size, s.sl_dist, s.account(), ring_win,
                                ring_eq, self.params)
        s.set_account(acc)
        s.ring_win = ring_win.tolist()
        s.ring_eq = ring_eq.tolist()
        rec = TradeRecord(
            entry_bar=s.entry_bar, exit_bar=bar, entry_time_ns=s.entry_time_ns, exit_time_ns=time_ns, side=s.side,
            size=s.size, entry_price=s.entry_price, exit_price=float(exit_price), stop=s.stop, target=s.target,
            pnl=float(booked.pnl), r_multiple=float(booked.r_multiple), exit_reason=EXIT_REASONS[int(reason)],
            risk_mult=s.risk_mult,
        )
        s.side = FLAT
        s.size = 0.0
        s.pending_exit = 0
        s.entry_bar = -1
        trips = [code for code in TRIP_CODES if int(booked.trips) & trip_bit(code)]
        return rec, trips
