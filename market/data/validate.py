"""Candle validation: the rules every frame passes before anything uses or stores it.

Why these rules and this order: models, labels and the backtest silently produce nonsense from a shuffled, gappy or
inconsistent series, so problems stop the run with one line naming the source, the first bad row (file line and
timestamp) and the rule. Only one thing is repaired: a row repeated identically is dropped (with a warning); two
*different* rows for one time are refused, naming both, because nothing here can tell which one is right. Gaps
and spikes are *reported*: real exchanges halt for an hour now and then, and real prices jump; a model must see
them, not a cleaned fiction.

Rules, checked in this order:
1. rows sorted by time (a row earlier than its predecessor stops the run: the file was concatenated or shuffled);
2. identical duplicate rows dropped with a warning; conflicting ones (same time, other values) stop the run;
3. every timestamp on the 15-minute grid, and none after now + one bar (year 2099, a wrong time zone);
4. per row: no NaN/inf, all prices > 0, high >= low, low <= open/close <= high, volumes and spread >= 0
   (the earliest row that breaks any of these is named, with every rule it breaks);
5. gaps (distance between consecutive bar opens > 15 min). ``data.market_closures="none"`` (24/7, e.g. BTCUSD):
   a gap up to ``data.max_gap_minutes`` is reported and kept, a larger one stops the run.
   ``"weekends"`` (FX/CFD hours): a gap over a Saturday (up to three days + ``max_closure_gap_minutes``) is an
   expected weekend closure, a weekday gap up to ``max_gap_minutes`` is a plain gap, up to
   ``max_closure_gap_minutes`` a closure (holiday, broker outage); all are reported and kept, anything larger stops;
6. spikes: |log return| > ``data.spike_sigma`` x a trailing robust sigma (1.4826 x rolling median |log return|
   over one week, floored at a fifth of the series' own robust sigma) are counted and listed, and kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from core.config import Config
from core.errors import UserError
from market.data.sources import BAR, COLUMNS, PRICE_COLUMNS

log = logging.getLogger("market.data")

_BAR_NS = BAR.value
_SPIKE_WINDOW = 672  # one week of M15 bars
_SPIKE_MIN_PERIODS = 96
_SAT_NOON = pd.Timestamp("1970-01-03 12:00", tz="UTC")  # a Saturday noon, anchor of the weekly grid
_WEEK = pd.Timedelta(days=7)


@dataclass(frozen=True)
class Gap:
    """A hole in the series: ``start``/``end`` are the opens of the bars on both sides; ``minutes`` = end - start."""

    start: pd.Timestamp
    end: pd.Timestamp
    minutes: int
    kind: str  # "gap" (unexpected but tolerated), "weekend" or "closure" (expected market closures)

    @property
    def missing_bars(self) -> int:
        return self.minutes // 15 - 1

    def __str__(self) -> str:
        return f"{self.start:%Y-%m-%d %H:%M} UTC +{self.minutes} min ({self.kind})"


@dataclass
class Report:
    """What validation found: the caller prints it and keeps it with the run's results."""

    rows: int
    start: pd.Timestamp | None
    end: pd.Timestamp | None
    gaps: list[Gap] = field(default_factory=list)
    spikes: int = 0
    spike_times: list[pd.Timestamp] = field(default_factory=list)
    duplicates_dropped: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def unexpected_gaps(self) -> list[Gap]:
        """Gaps that are not an expected market closure (on a 24/7 symbol: all of them)."""
        return [g for g in self.gaps if g.kind == "gap"]

    def restricted(self, frame: pd.DataFrame) -> Report:
        """The report for the part of the series that ``frame`` (a tail of it) keeps."""
        if len(frame) == 0:
            return replace(self, rows=0, start=None, end=None, gaps=[], spikes=0, spike_times=[])
        first = frame.index[0]
        times = [t for t in self.spike_times if t >= first]
        return replace(
            self,
            rows=len(frame),
            start=first,
            end=frame.index[-1],
            gaps=[g for g in self.gaps if g.start >= first],
            spikes=len(times),
            spike_times=times,
        )

    def summary_lines(self) -> list[str]:
        """Human-readable lines: rows, range, gaps with sizes, spikes, duplicates, warnings."""
        lines = [f"rows: {self.rows}"]
        if self.start is not None and self.end is not None:
            lines.append(f"range: {self.start:%Y-%m-%d %H:%M} .. {self.end:%Y-%m-%d %H:%M} UTC")
        unexpected = self.unexpected_gaps
        expected = [g for g in self.gaps if g.kind != "gap"]
        if unexpected:
            shown = ", ".join(str(g) for g in unexpected[:10])
            more = f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""
            lines.append(f"gaps: {len(unexpected)} kept: {shown}{more}")
        else:
            lines.append("gaps: none")
        if expected:
            kinds = sorted({g.kind for g in expected})
            counts = ", ".join(f"{sum(g.kind == k for g in expected)} {k}" for k in kinds)
            lines.append(f"market closures (expected): {counts}")
        spikes = f"spikes: {self.spikes} flagged, kept"
        if self.spike_times:
            spikes += " (" + ", ".join(f"{t:%Y-%m-%d %H:%M}" for t in self.spike_times[:5])
            spikes += ", ...)" if self.spikes > 5 else ")"
        lines.append(spikes)
        lines.append(f"duplicates dropped: {self.duplicates_dropped}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return lines


class _Where:
    """Names a row: the file line when the frame came from a text file, else the 1-based row."""

    def __init__(self, name: str, index: pd.DatetimeIndex, positions: np.ndarray, line_base: int | None) -> None:
        self.name, self.index, self.positions, self.line_base = name, index, positions, line_base

    def row(self, i: int) -> str:
        """``line N (time UTC)`` / ``row N (time UTC)`` without the source name."""
        pos = int(self.positions[i])
        where = f"line {pos + self.line_base}" if self.line_base is not None else f"row {pos + 1}"
        return f"{where} ({self.index[i]:%Y-%m-%d %H:%M} UTC)"

    def __call__(self, i: int) -> str:
        return f"{self.name}: {self.row(i)}"


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _fmt(x: float) -> str:
    return f"{x:.10g}"


def _row_rules(frame: pd.DataFrame) -> list[tuple[np.ndarray, object]]:
    """(mask, describe(i) -> str) for every per-row rule, in the order they are named."""
    v = {c: frame[c].to_numpy(dtype="float64") for c in COLUMNS}
    o, h, lo, c = v["open"], v["high"], v["low"], v["close"]
    rules: list[tuple[np.ndarray, object]] = []
    for col in COLUMNS:
        bad = ~np.isfinite(v[col])
        rules.append((bad, lambda i, col=col: f"{col} is NaN (empty, not a number or infinite): NaN is not allowed"))
    finite = np.isfinite(o) & np.isfinite(h) & np.isfinite(lo) & np.isfinite(c)
    for col in PRICE_COLUMNS:
        bad = np.isfinite(v[col]) & (v[col] <= 0)
        rules.append((bad, lambda i, col=col: f"{col}={_fmt(v[col][i])}: prices must be > 0 (zero or negative price)"))
    tol = 1e-9 * np.abs(np.where(finite, h, 0.0))
    rules.append((finite & (h < lo - tol), lambda i: f"high < low (high={_fmt(h[i])}, low={_fmt(lo[i])})"))

    def ohlc(i: int) -> str:
        return f"open={_fmt(o[i])}, high={_fmt(h[i])}, low={_fmt(lo[i])}, close={_fmt(c[i])}"

    rules.append(
        (finite & (lo > np.minimum(o, c) + tol), lambda i: f"low above open/close ({ohlc(i)}): need low <= open, close")
    )
    rules.append(
        (
            finite & (h < np.maximum(o, c) - tol),
            lambda i: f"high below open/close ({ohlc(i)}): need high >= open, close",
        )
    )
    for col in ("tick_volume", "spread", "real_volume"):
        bad = np.isfinite(v[col]) & (v[col] < 0)
        rules.append((bad, lambda i, col=col: f"{col}={_fmt(v[col][i])}: must be >= 0"))
    return rules


def _classify_gaps(idx: pd.DatetimeIndex, cfg: Config, where: _Where) -> list[Gap]:
    ns = idx.asi8
    steps = np.diff(ns)
    at = np.flatnonzero(steps > _BAR_NS)
    gaps: list[Gap] = []
    weekends = cfg.data.market_closures == "weekends"
    max_gap = cfg.data.max_gap_minutes
    max_closure = max(cfg.data.max_closure_gap_minutes, max_gap)
    weekend_max = 3 * 1440 + cfg.data.max_closure_gap_minutes
    for i in at:
        start, end = idx[i], idx[i + 1]
        minutes = int(steps[i] // 60_000_000_000)
        if weekends:
            # next Saturday noon strictly after start: does the gap cover it?
            k = (start - _SAT_NOON) // _WEEK + 1
            sat_noon = _SAT_NOON + k * _WEEK
            if start < sat_noon < end and minutes <= weekend_max:
                kind = "weekend"
            elif minutes <= max_gap:
                kind = "gap"
            elif minutes <= max_closure:
                kind = "closure"
            else:
                raise UserError(
                    f"{where(i + 1)}: gap of {minutes} minutes after {start:%Y-%m-%d %H:%M} UTC is longer than a "
                    f"market closure allows (data.max_closure_gap_minutes={cfg.data.max_closure_gap_minutes}, "
                    f"weekends up to {weekend_max})"
                )
        elif minutes <= max_gap:
            kind = "gap"
        else:
            raise UserError(
                f"{where(i + 1)}: gap of {minutes} minutes after {start:%Y-%m-%d %H:%M} UTC exceeds "
                f"data.max_gap_minutes={max_gap} (24/7 market; set data.market_closures='weekends' for FX/CFD hours)"
            )
        gaps.append(Gap(start=start, end=end, minutes=minutes, kind=kind))
    return gaps


def _spikes(close: np.ndarray, sigma_mult: float) -> np.ndarray:
    """Indices of bars whose close-to-close |log return| exceeds ``sigma_mult`` x the trailing robust sigma."""
    if close.size < 3:
        return np.zeros(0, dtype=np.int64)
    r = np.diff(np.log(close))
    a = pd.Series(np.abs(r))
    overall = 1.4826 * float(np.median(a))
    floor = max(overall / 5.0, 1e-12)
    rolling = 1.4826 * a.rolling(_SPIKE_WINDOW, min_periods=_SPIKE_MIN_PERIODS).median().shift(1)
    sigma = np.maximum(rolling.fillna(overall).to_numpy(), floor)
    return np.flatnonzero(np.abs(r) > sigma_mult * sigma) + 1


def validate(frame: pd.DataFrame, cfg: Config, name: str, now: pd.Timestamp | None = None
             ) -> tuple[pd.DataFrame, Report]:
    """Check ``frame`` (standard columns, UTC index) against every rule; return the cleaned frame and the report.

    ``name`` (a file path or a source description) starts every error message. Raises :class:`UserError` on the
    first rule that cannot be repaired; nothing is written here, so a failure leaves every store as it was.
    ``now`` (default: the clock) bounds the timestamps: a bar opening after ``now`` + one bar is an error.
    """
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{name}: missing columns {', '.join(missing)}")
    if len(frame) == 0:
        raise UserError(f"{name}: no bars")
    idx = pd.DatetimeIndex(frame.index)
    if idx.tz is None:
        raise UserError(f"{name}: timestamps carry no time zone (internal: readers must give UTC)")
    idx = idx.tz_convert("UTC").as_unit("ns")
    line_base = frame.attrs.get("line_base")
    positions = np.arange(len(frame))
    where = _Where(name, idx, positions, line_base)

    if idx.hasnans:
        i = _first(np.asarray(idx.isna()))
        raise UserError(f"{name}: {'line ' + str(i + line_base) if line_base else 'row ' + str(i + 1)}: no timestamp")
    ns = idx.asi8
    steps = np.diff(ns)
    back = _first(steps < 0)
    if back is not None:
        raise UserError(f"{where(back + 1)}: rows not sorted by time: comes after {idx[back]:%Y-%m-%d %H:%M} UTC")

    warnings: list[str] = []
    dup_first = np.r_[steps == 0, False]  # row i duplicates row i+1
    n_dup = int(dup_first.sum())
    values = frame[list(COLUMNS)].to_numpy(dtype="float64")
    if n_dup:
        pos = np.flatnonzero(dup_first)
        same = np.all((values[pos] == values[pos + 1]) | (np.isnan(values[pos]) & np.isnan(values[pos + 1])), axis=1)
        if not same.all():
            # Two different bars for one time: one of them is wrong and nothing here can tell which (a re-export,
            # a concatenation of two sources, a typo at -50%): refuse, naming both rows.
            k = int(pos[np.flatnonzero(~same)[0]])
            a, b = values[k], values[k + 1]
            differ = [j for j in range(len(COLUMNS)) if not (a[j] == b[j] or (np.isnan(a[j]) and np.isnan(b[j])))]
            diff = ", ".join(f"{COLUMNS[j]}={_fmt(a[j])} vs {_fmt(b[j])}" for j in differ)
            raise UserError(
                f"{where(k)} and {where.row(k + 1)}: two rows for the same time with different values ({diff}); "
                "remove the wrong one (identical duplicates are dropped, conflicting ones never guessed)"
            )
        msg = f"{where(int(pos[0]))}: dropped {n_dup} duplicate row(s) identical to the next row"
        log.warning(msg)
        warnings.append(msg)
        keep = ~dup_first
        idx, values, positions = idx[keep], values[keep], positions[keep]
        ns = idx.asi8
        where = _Where(name, idx, positions, line_base)

    off = _first(ns % _BAR_NS != 0)
    if off is not None:
        raise UserError(f"{where(off)}: timestamp not on the 15-minute grid (bar opens at :00, :15, :30, :45)")

    limit = (pd.Timestamp.now(tz="UTC") if now is None else now) + BAR
    future = _first(ns > limit.value)
    if future is not None:
        raise UserError(f"{where(future)}: bar in the future (after now + one bar, {limit:%Y-%m-%d %H:%M} UTC): "
                        "wrong year or time zone?")

    clean = pd.DataFrame(values, index=pd.DatetimeIndex(idx, name="time"), columns=list(COLUMNS))
    rules = _row_rules(clean)
    firsts = [(_first(mask), describe) for mask, describe in rules]
    hits = [(i, d) for i, d in firsts if i is not None]
    if hits:
        row = min(i for i, _ in hits)
        broken = "; ".join(d(row) for i, d in hits if i == row)  # type: ignore[operator]
        raise UserError(f"{where(row)}: {broken}")

    gaps = _classify_gaps(idx, cfg, where)
    spike_at = _spikes(clean["close"].to_numpy(), cfg.data.spike_sigma)
    report = Report(
        rows=len(clean),
        start=idx[0],
        end=idx[-1],
        gaps=gaps,
        spikes=int(spike_at.size),
        spike_times=[idx[i] for i in spike_at],
        duplicates_dropped=n_dup,
        warnings=warnings,
    )
    clean.attrs["source"] = frame.attrs.get("source", name)
    clean.attrs["demo"] = bool(frame.attrs.get("demo", False))
    return clean, report


def trim_history(frame: pd.DataFrame, report: Report, cfg: Config) -> tuple[pd.DataFrame, Report]:
    """Keep the most recent ``data.history_days``: what a run *uses* (every loader returns this), never what the
    store *keeps* (the store only grows; ``--quick`` and ``history_days`` must not delete broker history)."""
    if len(frame) == 0:
        return frame, report
    cutoff = frame.index[-1] - pd.Timedelta(days=cfg.data.history_days)
    if frame.index[0] > cutoff:
        return frame, report
    kept = frame.loc[frame.index > cutoff].copy()
    kept.attrs = dict(frame.attrs)
    return kept, report.restricted(kept)
