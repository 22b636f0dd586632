"""Where the bot's closed M15 bars come from, and which bars it refuses.

* :class:`FileFeed` plays a recorded candle file (``--data FILE --from --to``) as fast as possible; the file is loaded
  with :func:`market.data.load_candles`, exactly as ``backtest/run.py`` loads it, so parity compares like with like.
* :class:`MT5Feed` asks the terminal through :func:`market.data.mt5.fetch` (the data refresh's code path: the
  ``MetaTrader5`` package on Windows, the ``mt5linux`` bridge on Linux; server time converted to UTC; the forming bar
  never returned).

:func:`check_bar` is the bot's gate on every new bar: a duplicate, a bar out of order or off the 15-minute grid, or
a bar with inconsistent prices is refused (one log line and an alert, no decision on it); a gap is reported and the
bar is used (the backtest treats a gap as a market halt), but a gap longer than ``data.max_gap_minutes`` also blocks
the entry decision on that bar (the backtest refuses such a window altogether).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from core.config import Config
from core.errors import UserError

BAR_NS = 15 * 60 * 1_000_000_000
FIELDS = ("open", "high", "low", "close", "tick_volume", "spread")


class FeedError(Exception):
    """The feed cannot deliver right now (terminal disconnected, call failed): retry later, never crash."""


@dataclass(frozen=True)
class Bar:
    """One closed M15 bar (UTC open time in ns)."""

    time_ns: int
    open: float
    high: float
    low: float
    close: float
    tick_volume: float
    spread: float

    @property
    def time(self) -> pd.Timestamp:
        return pd.Timestamp(self.time_ns, tz="UTC")

    def values(self) -> tuple[float, ...]:
        return (self.open, self.high, self.low, self.close, self.tick_volume, self.spread)

    def to_json(self) -> dict[str, Any]:
        return {"t": self.time.isoformat(), "o": self.open, "h": self.high, "l": self.low, "c": self.close,
                "v": self.tick_volume, "s": self.spread}


def bars_from_frame(frame: pd.DataFrame) -> list[Bar]:
    """Standard candle frame -> bars (plain Python floats, so journals and MT5 requests hold no numpy scalars)."""
    t = frame.index.as_unit("ns").asi8
    cols = [frame[c].to_numpy(np.float64) for c in FIELDS]
    return [Bar(int(t[i]), *(float(col[i]) for col in cols)) for i in range(len(frame))]


@dataclass
class Verdict:
    """What :func:`check_bar` decided: ``use`` the bar or not, ``block_entry`` on it, and what to say."""

    use: bool
    block_entry: bool = False
    problem: str = ""  # "" when the bar is fine; else a short key (journal / alert)
    message: str = ""


def check_bar(bar: Bar, last: Bar | None, cfg: Config) -> Verdict:
    """The bot's gate on a new bar, given the last bar it used (module docstring)."""
    when = f"bar {bar.time:%Y-%m-%d %H:%M} UTC"
    vals = bar.values()
    if not all(math.isfinite(v) for v in vals):
        return Verdict(False, problem="not_finite", message=f"{when}: a price/volume is not a finite number: refused")
    o, h, lo, c = bar.open, bar.high, bar.low, bar.close
    if min(o, h, lo, c) <= 0 or h < lo or h < max(o, c) or lo > min(o, c):
        return Verdict(False, problem="bad_ohlc",
                       message=f"{when}: inconsistent prices (open {o}, high {h}, low {lo}, close {c}; need "
                               f"low <= open/close <= high, all > 0): refused, no decision on it")
    if bar.time_ns % BAR_NS:
        return Verdict(False, problem="off_grid", message=f"{when}: not on the 15-minute grid: refused")
    if last is None:
        return Verdict(True)
    if bar.time_ns == last.time_ns:
        if bar.values() == last.values():
            return Verdict(False, problem="repeat")  # the same bar again (fetch from the last bar): not news
        return Verdict(False, problem="duplicate",
                       message=f"{when}: duplicated bar with different values (had close {last.close}, got "
                               f"{bar.close}): refused, the first one stands")
    if bar.time_ns < last.time_ns:
        return Verdict(False, problem="out_of_order",
                       message=f"{when}: out of order (the last bar used is {last.time:%Y-%m-%d %H:%M} UTC): refused")
    gap_min = (bar.time_ns - last.time_ns) // 60_000_000_000
    if gap_min > 15:
        missing = gap_min // 15 - 1
        too_long = gap_min > cfg.data.max_gap_minutes
        tail = (f"longer than data.max_gap_minutes = {cfg.data.max_gap_minutes}: no entry decision on this bar"
                if too_long else "used as a market halt, like the backtest")
        return Verdict(True, block_entry=too_long, problem="gap",
                       message=f"{when}: {missing} missing bar(s) after {last.time:%Y-%m-%d %H:%M} UTC "
                               f"({gap_min}-minute step): {tail}")
    return Verdict(True)


class FileFeed:
    """A recorded candle file played bar by bar over ``[start, end)`` (``backtest/run.py``'s window semantics)."""

    live = False

    def __init__(self, cfg: Config, root: Any, path: str, start: str | None, end: str | None) -> None:
        from backtest.engine import check_window_gaps, resolve_window
        from core.paths import Paths
        from market.data import load_candles

        self.path = path
        self.candles = load_candles(cfg, Paths.of(root), path)
        idx = self.candles.index
        for v in (start, end):
            if v is not None:
                try:
                    pd.Timestamp(v)
                except (ValueError, TypeError):
                    raise UserError(f"--from/--to: not a date/time: {v!r}") from None
        self.start, self.end = resolve_window(idx, start, end)
        ns = idx.as_unit("ns").asi8
        gaps = np.flatnonzero(np.diff(ns) > cfg.data.max_gap_minutes * 60 * 1_000_000_000) + 1
        check_window_gaps(idx, gaps, self.start, self.end, cfg.data.max_gap_minutes)
        self._lo = max(0, self.start - 4 * 880)  # only the stretch a run can ask for becomes Bar objects
        self._bars = bars_from_frame(self.candles.iloc[self._lo:self.end])
        self._ns = ns

    def position(self, time_ns: int) -> int:
        """Position of the bar at ``time_ns`` in the file (the bot numbers bars like the backtest)."""
        return int(np.searchsorted(self._ns, time_ns))

    def history(self, n: int, until_ns: int | None) -> list[Bar]:
        """The ``n`` bars before the window start (``until_ns`` None) or up to and including ``until_ns``."""
        stop = self.start if until_ns is None else self.position(until_ns) + 1
        return self._bars[max(0, stop - n - self._lo):stop - self._lo]

    def poll(self, after_ns: int | None, limit: int = 256) -> list[Bar]:
        """The next bars of the window after ``after_ns`` (a batch; empty when the window is done)."""
        i = self.start if after_ns is None else self.position(after_ns) + 1
        i = max(i, self.start)
        return self._bars[i - self._lo:min(self.end, i + limit) - self._lo]

    def is_last(self, bar: Bar) -> bool:
        return self.position(bar.time_ns) == self.end - 1

    def done(self, after_ns: int | None) -> bool:
        return after_ns is not None and self.position(after_ns) >= self.end - 1


class MT5Feed:
    """Closed M15 bars from the terminal via :func:`market.data.mt5.fetch` (one code path with the data refresh)."""

    live = True

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def _fetch(self, since: pd.Timestamp) -> list[Bar]:
        from market.data.mt5 import fetch

        try:
            res = fetch(self.cfg, since=since)
        except UserError as exc:
            raise FeedError(str(exc)) from None
        return bars_from_frame(res.frame)

    def history(self, n: int, until_ns: int | None) -> list[Bar]:
        now = pd.Timestamp.now(tz="UTC")
        since = now - pd.Timedelta(minutes=15 * (n + 200))  # margin for halts
        bars = self._fetch(since)
        if until_ns is not None:
            bars = [b for b in bars if b.time_ns <= until_ns]
        return bars[-n:]

    def poll(self, after_ns: int | None, limit: int = 256) -> list[Bar]:
        """Bars from the last used one (inclusive: the caller drops the repeat) up to now."""
        since = pd.Timestamp(after_ns, tz="UTC") if after_ns is not None else pd.Timestamp.now(tz="UTC")
        return self._fetch(since)[:limit]

    def is_last(self, bar: Bar) -> bool:
        return False

    def done(self, after_ns: int | None) -> bool:
        return False
