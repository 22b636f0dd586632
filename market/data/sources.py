"""Candle file readers: MT5 "Export bars" CSV, plain CSV and Parquet -> the standard frame (not yet validated).

Why one reader module: every entry point (``--data PATH``, ``data.file`` in config.json, the store) must turn a file
into exactly the same standard frame, and every problem with the *file itself* (truncated, wrong columns, a timestamp
that does not parse) must become one :class:`~core.errors.UserError` line naming the file and the line. Problems with
the *values* (order, gaps, OHLC rules, NaN) are :mod:`market.data.validate`'s job.

Time zones: an MT5 export carries broker **server time**, converted with ``cfg.data.server_timezone`` (the same rule
as the live MT5 fetch). A plain CSV/Parquet timestamp is taken as UTC unless it carries its own offset. Epoch numbers
(seconds or milliseconds) are UTC.

Each returned frame has ``attrs["line_base"]``: file line of position 0 (2 for a CSV with a header line), so that the
validator can name the *file line* of the first bad row; ``None`` where lines mean nothing (Parquet: it names the row).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from core.config import Config
from core.errors import UserError

COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "tick_volume", "spread", "real_volume")
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
BAR = pd.Timedelta(minutes=15)

# Accepted spellings (after lower-casing and stripping "<>", spaces, dashes). First match wins.
_TIME_NAMES = ("time", "timestamp", "timestamp_utc", "datetime", "date_time", "open_time", "date")
_ALIASES: dict[str, tuple[str, ...]] = {
    "open": ("open", "o"),
    "high": ("high", "h"),
    "low": ("low", "l"),
    "close": ("close", "c"),
    "tick_volume": ("tick_volume", "tickvol", "tick_vol", "ticks"),
    "real_volume": ("real_volume", "vol", "real_vol"),
    "spread": ("spread",),
}


def _norm(name: object) -> str:
    return str(name).strip().strip("<>").strip().lower().replace(" ", "_").replace("-", "_")


def server_zone(cfg: Config) -> ZoneInfo:
    """The broker server's time zone from config (a zoneinfo name such as ``Europe/Athens``)."""
    try:
        return ZoneInfo(cfg.data.server_timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise UserError(
            f"config.json: data.server_timezone: unknown time zone {cfg.data.server_timezone!r} "
            "(use a zoneinfo name such as 'Europe/Athens' or 'UTC')"
        ) from None


def server_wall_to_utc(wall: pd.DatetimeIndex | pd.Series | np.ndarray, zone: ZoneInfo, what: str) -> pd.DatetimeIndex:
    """Broker wall-clock times (naive) -> UTC.

    Why the special cases: at the autumn DST change the server clock repeats an hour. A terminal that keeps both
    copies gives the same wall time twice (first = summer time, second = winter time); a terminal that merged them
    gives it once, and the bar *opened* at the first occurrence, so a single copy is read as summer time. A wall time
    inside the spring-forward hole cannot come from a server in ``zone``: that stops the run (wrong time zone).
    """
    idx = pd.DatetimeIndex(wall)
    if idx.tz is not None:
        return idx.tz_convert("UTC").as_unit("ns")
    if str(zone) == "UTC":
        return idx.tz_localize("UTC").as_unit("ns")
    first_seen = ~pd.Index(idx).duplicated(keep="first")
    local = idx.tz_localize(zone, ambiguous=np.asarray(first_seen, dtype=bool), nonexistent="NaT")
    bad = np.flatnonzero(pd.isna(local) & ~pd.isna(idx))
    if bad.size:
        raise UserError(
            f"{what}: server time {idx[bad[0]]:%Y-%m-%d %H:%M} does not exist in {zone} (skipped by the DST change): "
            "is data.server_timezone right?"
        )
    return local.tz_convert("UTC").as_unit("ns")


# ------------------------------------------------------------------------------------------------------- helpers
def _read_text(path: Path) -> str:
    """Decode a text file; MT5 exports are sometimes UTF-16 with a BOM."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _delimiter(header: str) -> str:
    for sep in ("\t", ";", ","):
        if sep in header:
            return sep
    return ","


def _check_truncation(path: Path, text: str, sep: str, n_fields: int) -> None:
    """A file cut off mid-line has a last line with fewer fields than the header (and usually no final newline)."""
    stripped = text.rstrip("\r\n")
    last_nl = stripped.rfind("\n")
    if last_nl < 0:
        return
    last = stripped[last_nl + 1 :].rstrip("\r")
    got = len(last.split(sep))
    if got < n_fields or (not text.endswith("\n") and last.strip() == ""):
        line_no = stripped.count("\n") + 1
        raise UserError(
            f"{path}: line {line_no}: truncated file: the last line has {got} of {n_fields} fields ({last[:40]!r})"
        )


def _parse_csv(path: Path, text: str, sep: str) -> pd.DataFrame:
    try:
        return pd.read_csv(io.StringIO(text), sep=sep, skip_blank_lines=True)
    except pd.errors.ParserError as exc:
        raise UserError(f"{path}: not a readable CSV: {exc}") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: empty file") from None


def _numbers(raw: pd.DataFrame, col: str) -> np.ndarray:
    """Text -> float64; text that is no number becomes NaN (reported by the validator as 'NaN' at its line)."""
    s = raw[col]
    if s.dtype.kind in "fiu":
        return s.to_numpy(dtype="float64")
    return pd.to_numeric(s.astype(str).str.strip(), errors="coerce").to_numpy(dtype="float64")


def _bad_time(path: Path, source: pd.Series, parsed: pd.DatetimeIndex, line_base: int | None) -> None:
    bad = np.flatnonzero(pd.isna(parsed))
    if bad.size:
        i = int(bad[0])
        where = f"line {i + line_base}" if line_base is not None else f"row {i + 1}"
        raise UserError(f"{path}: {where}: unreadable timestamp {str(source.iloc[i])!r}")


def _parse_times(path: Path, values: pd.Series, line_base: int | None) -> pd.DatetimeIndex:
    """UTC times from strings (ISO-like; naive = UTC) or epoch numbers (seconds, or milliseconds when > 1e11)."""
    if values.dtype.kind in "iuf":
        num = values.to_numpy(dtype="float64")
        unit = "ms" if np.nanmax(np.abs(num)) > 1e11 else "s"
        parsed = pd.DatetimeIndex(pd.to_datetime(num, unit=unit, utc=True, errors="coerce"))
        _bad_time(path, values, parsed, line_base)
        return parsed.as_unit("ns")
    if values.dtype.kind == "M":
        idx = pd.DatetimeIndex(values)
        idx = idx.tz_localize("UTC") if idx.tz is None else idx.tz_convert("UTC")
        _bad_time(path, values, idx, line_base)
        return idx.as_unit("ns")
    text = values.astype(str).str.strip()
    if len(text) and text.str.fullmatch(r"\d{9,13}").all():
        return _parse_times(path, text.astype("int64"), line_base)
    if len(text) and text.str.match(r"\d{4}\.\d\d\.\d\d").all():  # MT5's 2023.01.02 date layout
        text = text.str.replace(".", "-", n=2, regex=False)
    parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
    if pd.isna(parsed).any():  # other layouts ("01/02/2023 07:00"): slower per-element parser
        parsed = pd.to_datetime(text, format="mixed", utc=True, errors="coerce")
    idx = pd.DatetimeIndex(parsed)
    _bad_time(path, text, idx, line_base)
    return idx.as_unit("ns")


def _find(cols: dict[str, str], names: Sequence[str]) -> str | None:
    return next((cols[n] for n in names if n in cols), None)


def standardize(
    raw: pd.DataFrame, cfg: Config, path: Path, line_base: int | None, server_time: bool = False
) -> pd.DataFrame:
    """Map a raw table with case-insensitive standard names onto the standard frame (float64, UTC index 'time').

    ``volume`` alone fills both real_volume and tick_volume; a missing spread gets ``cfg.costs.default_spread_points``;
    a missing volume column is 0. Missing time or OHLC columns stop with the columns that were found.
    """
    cols: dict[str, str] = {}
    for c in raw.columns:
        cols.setdefault(_norm(c), c)
    date_col = cols.get("date")
    time_col = cols.get("time")
    if date_col is not None and time_col is not None and date_col != time_col:
        tsrc = raw[date_col].astype(str).str.strip() + " " + raw[time_col].astype(str).str.strip()
    else:
        tname = _find(cols, _TIME_NAMES)
        tsrc = raw[tname] if tname is not None else None
    found: dict[str, str | None] = {k: _find(cols, v) for k, v in _ALIASES.items()}
    vol = cols.get("volume")
    missing = [k for k in PRICE_COLUMNS if found[k] is None]
    if tsrc is None:
        missing.insert(0, "time (or timestamp/timestamp_utc/date)")
    if missing:
        raise UserError(
            f"{path}: wrong columns: missing {', '.join(missing)} (found: {', '.join(map(str, raw.columns))}); "
            "expected time, open, high, low, close[, tick_volume, spread, real_volume | volume]"
        )
    if len(raw) == 0:
        raise UserError(f"{path}: no rows after the header")
    times = _parse_times(path, pd.Series(tsrc).reset_index(drop=True), line_base)
    if server_time:
        times = server_wall_to_utc(times.tz_localize(None), server_zone(cfg), str(path))
    out: dict[str, np.ndarray] = {k: _numbers(raw, found[k]) for k in PRICE_COLUMNS}  # type: ignore[index]
    n = len(raw)
    vol_values = _numbers(raw, vol) if vol is not None else None
    for k in ("tick_volume", "real_volume"):
        if found[k] is not None:
            out[k] = _numbers(raw, found[k])  # type: ignore[arg-type]
        elif vol_values is not None:
            out[k] = vol_values.copy()
        else:
            out[k] = np.zeros(n)
    if found["spread"] is not None:
        out["spread"] = _numbers(raw, found["spread"])  # type: ignore[arg-type]
    else:
        out["spread"] = np.full(n, float(cfg.costs.default_spread_points))
    frame = pd.DataFrame({k: out[k] for k in COLUMNS}, index=pd.DatetimeIndex(times, name="time"))
    frame.attrs["line_base"] = line_base
    return frame


# --------------------------------------------------------------------------------------------------- the readers
def is_mt5_export(text: str) -> bool:
    """An MT5 "Export bars" file starts with the ``<DATE>`` header."""
    return text.lstrip("\ufeff").lstrip().upper().startswith("<DATE>")


def read_csv_file(path: Path, cfg: Config) -> pd.DataFrame:
    """Plain CSV (comma, semicolon or tab) or an MT5 "Export bars" CSV, told apart by the header."""
    text = _read_text(path)
    if not text.strip():
        raise UserError(f"{path}: empty file")
    header = text.split("\n", 1)[0].rstrip("\r")
    sep = _delimiter(header)
    _check_truncation(path, text, sep, len(header.split(sep)))
    raw = _parse_csv(path, text, sep)
    mt5 = is_mt5_export(text)
    frame = standardize(raw, cfg, path, line_base=2, server_time=mt5)
    frame.attrs["source"] = f"{'mt5 export' if mt5 else 'file'} {path}"
    return frame


def check_parquet_rows(path: Path, max_rows: int, what: str = "Parquet file") -> int:
    """The row count from the Parquet footer (nothing decoded); :class:`UserError` beyond ``max_rows``.

    Why before reading: a few MB of Parquet (dictionary/RLE encoded) can expand to tens of millions of rows and
    several GB, and ``read_table`` would die with MemoryError (or get the process killed) instead of one line."""
    try:
        rows = int(pq.ParquetFile(path).metadata.num_rows)
    except Exception as exc:  # pyarrow raises several types for a cut or foreign file
        raise UserError(f"{path}: not a readable Parquet file (truncated or not Parquet?): {exc}") from None
    if rows > max_rows:
        raise UserError(f"{path}: {what} has {rows:,} rows, more than data.max_rows={max_rows:,}: refused before "
                        "reading (raise data.max_rows in config.json if this is really candle history)")
    return rows


def read_parquet_file(path: Path, cfg: Config) -> pd.DataFrame:
    """A Parquet file with the standard columns (a DatetimeIndex or a time column)."""
    check_parquet_rows(path, cfg.data.max_rows, "candle file")
    try:
        raw = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a cut or foreign file
        raise UserError(f"{path}: not a readable Parquet file (truncated or not Parquet?): {exc}") from None
    if isinstance(raw.index, pd.DatetimeIndex):
        raw = raw.reset_index(names=raw.index.name or "time")
    frame = standardize(raw, cfg, path, line_base=None)
    frame.attrs["source"] = f"file {path}"
    return frame


def read_file(path: str | Path, cfg: Config) -> pd.DataFrame:
    """Read any supported candle file into the standard frame (unvalidated: :func:`market.data.validate.validate`)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: candle file not found")
    if p.is_dir():
        raise UserError(f"{p}: is a folder, expected a candle file (.csv or .parquet)")
    frame = read_parquet_file(p, cfg) if p.suffix.lower() in {".parquet", ".pq"} else read_csv_file(p, cfg)
    frame.attrs["demo"] = False
    return frame


def mt5_rates_to_frame(rates: np.ndarray, cfg: Config, what: str) -> pd.DataFrame:
    """A ``copy_rates_*`` structured array (server-time epochs) -> the standard frame in UTC."""
    if rates is None or len(rates) == 0:
        return pd.DataFrame({k: np.zeros(0) for k in COLUMNS}, index=pd.DatetimeIndex([], tz="UTC", name="time"))
    wall = pd.to_datetime(np.asarray(rates["time"], dtype="int64"), unit="s")
    times = server_wall_to_utc(wall, server_zone(cfg), what)
    data = {k: np.asarray(rates[k], dtype="float64") for k in COLUMNS}
    frame = pd.DataFrame(data, index=pd.DatetimeIndex(times, name="time"))
    frame.attrs["line_base"] = None
    return frame
