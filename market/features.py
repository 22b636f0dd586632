"""The one feature code: used unchanged by training, the backtest (both modes) and the live loop.

Rules that make it safe (and that the tests prove):

* **Causal.** The row of bar ``t`` (bar *open* time ``T``; the decision is taken at its close ``T + 15 min``) uses only
  bars ``<= t``. Higher-timeframe (H1/H4) context comes only from *completed* H1/H4 bars: the last H1 bar whose close
  time is ``<= T + 15 min``. Prefix invariance follows: features on the first ``k`` bars equal the first ``k`` rows
  of the full computation, exactly.
* **Bounded memory.** Every indicator is a finite window (simple moving averages, rolling sums, rolling min/max; no
  recursive EMA), the longest being 30 H4 bars = 480 M15 bars. Computing on only the last :data:`WARMUP_BARS` bars
  before ``t`` therefore gives row ``t`` of the full computation (up to float rounding of rolling sums). The live bot
  relies on this to work from a bounded window and still match the backtest. Higher timeframes use only *closes*, so
  a window starting mid-H4 bar still yields that bar's correct close.
* **float32, vectorised.** Computation in float64, output cast once to float32. Three years of M15 take well under
  a second.

News features come from an optional economic-calendar CSV (``config.features.calendar_csv``): columns
``time_utc`` (ISO 8601, UTC), ``currency``, ``impact`` (``high``/``medium``/``low``), ``event``. Only high-impact
events count. Scheduled times are published in advance, so using the *next* event's time is not look-ahead. See
``examples/economic_calendar.csv``. Without a calendar the news columns hold their "no event" values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.config import SESSIONS, Config, default_config

WARMUP_BARS = 768  # >= the longest look-back (30 H4 bars = 480 M15 bars) plus alignment margin
NEWS_CAP_MIN = 1440.0  # minutes; "no event within a day" saturates here
_BAR = pd.Timedelta(minutes=15)

MARKET_FEATURES = [
    "ret_1", "ret_4", "ret_16", "ret_64",
    "atr", "atr_pct", "rv_16", "rv_96", "vol_ratio",
    "dist_sma20_atr", "dist_sma50_atr", "sma20_slope_atr", "rsi_14", "bb_z_20", "range_pos_20",
    "body_atr", "upper_wick_atr", "lower_wick_atr",
    "vol_rel_96", "vol_z_96", "spread_atr", "spread_rel_96",
    "h1_ret_1", "h1_ret_4", "h1_dist_sma20", "h1_rsi_14",
    "h4_ret_1", "h4_ret_6", "h4_dist_sma20", "h4_rsi_14",
]
SESSION_FEATURES = ["sess_asia", "sess_london", "sess_new_york", "sess_overlap", "hour_sin", "hour_cos", "dow_sin",
                    "dow_cos"]
NEWS_FEATURES = ["news_min_to_next", "news_min_since_last", "news_blackout"]


def feature_names(config: Config | None = None) -> list[str]:
    """Column names of :func:`build_features`, in order (the order models are trained and served with)."""
    return [*MARKET_FEATURES, *SESSION_FEATURES, *NEWS_FEATURES]


def _rsi(close: pd.Series, n: int) -> pd.Series:
    """Cutler's RSI (simple averages): a finite window, unlike Wilder's recursive smoothing."""
    d = close.diff()
    up = d.clip(lower=0).rolling(n, min_periods=n).mean()
    dn = (-d.clip(upper=0)).rolling(n, min_periods=n).mean()
    return 100.0 * up / (up + dn).replace(0.0, np.nan)


def _htf(close: pd.Series, rule: str, ret_lags: tuple[int, int], index: pd.DatetimeIndex) -> dict[str, np.ndarray]:
    """Context from completed higher-timeframe bars, aligned to M15 bars without look-ahead.

    The HTF bar labelled ``L`` (covering ``[L, L + span)``) is complete at the close of the M15 bar opening at
    ``L + span - 15 min``. For an M15 bar opening at ``T`` the last complete HTF label is
    ``floor(T + 15 min, span) - span``; when that bucket is empty (an exchange halt) the last earlier bar is used.
    """
    span = pd.Timedelta(rule)
    htf = close.resample(rule, label="left", closed="left").last().dropna()  # empty buckets (halts) skipped
    logc = np.log(htf)
    sma = htf.rolling(20, min_periods=20).mean()
    out = {
        "ret_1": logc.diff(ret_lags[0]),
        "ret_n": logc.diff(ret_lags[1]),
        "dist": (htf - sma) / sma,
        "rsi": _rsi(htf, 14),
    }
    key = (index + _BAR).floor(rule) - span
    # the last *existing* completed HTF bar at or before the key (a halt leaves the previous bar in force)
    return {k: v.reindex(key, method="ffill").to_numpy(dtype=np.float64) for k, v in out.items()}


def _load_calendar(path: str | None) -> np.ndarray:
    """High-impact event times (int64 ns, sorted) from the calendar CSV, or an empty array."""
    if not path:
        return np.empty(0, dtype=np.int64)
    p = Path(path)
    if not p.exists():
        from core.errors import UserError

        raise UserError(f"{p}: economic calendar not found (config features.calendar_csv)")
    cal = pd.read_csv(p)
    cols = {c.lower(): c for c in cal.columns}
    if "time_utc" not in cols or "impact" not in cols:
        from core.errors import UserError

        raise UserError(f"{p}: calendar needs columns time_utc, currency, impact, event (got {list(cal.columns)})")
    high = cal[cal[cols["impact"]].astype(str).str.lower() == "high"]
    t = pd.to_datetime(high[cols["time_utc"]], utc=True)
    return np.sort(t.to_numpy(dtype="datetime64[ns]").astype(np.int64))


def _news(index: pd.DatetimeIndex, events: np.ndarray, blackout_min: int) -> dict[str, np.ndarray]:
    n = len(index)
    if events.size == 0:
        return {
            "news_min_to_next": np.full(n, NEWS_CAP_MIN),
            "news_min_since_last": np.full(n, NEWS_CAP_MIN),
            "news_blackout": np.zeros(n),
        }
    now = (index + _BAR).to_numpy(dtype="datetime64[ns]").astype(np.int64)  # decision time = bar close
    j = np.searchsorted(events, now, side="left")  # first event >= now
    nxt = np.where(j < events.size, events[np.minimum(j, events.size - 1)], np.iinfo(np.int64).max)
    prv = np.where(j > 0, events[np.maximum(j - 1, 0)], np.iinfo(np.int64).min)
    to_next = np.minimum((nxt.astype(np.float64) - now) / 6e10, NEWS_CAP_MIN)
    since = np.minimum((now - prv.astype(np.float64)) / 6e10, NEWS_CAP_MIN)
    black = ((to_next <= blackout_min) | (since <= blackout_min)).astype(np.float64)
    return {"news_min_to_next": to_next, "news_min_since_last": since, "news_blackout": black}


def session_flags(index: pd.DatetimeIndex) -> dict[str, np.ndarray]:
    """Session membership of each bar from its UTC open hour (see :data:`core.config.SESSIONS`)."""
    hour = index.hour.to_numpy()
    flags = {f"sess_{name}": ((hour >= lo) & (hour < hi)).astype(np.float64) for name, (lo, hi) in SESSIONS.items()}
    flags["sess_overlap"] = flags["sess_london"] * flags["sess_new_york"]
    return flags


def build_features(candles: pd.DataFrame, config: Config | None = None) -> pd.DataFrame:
    """All features for every bar of ``candles`` (standard candle frame), float32, same index.

    ``config=None`` means the schema's defaults. Rows inside the warm-up hold NaN where a window is not yet full;
    models and the backtest skip the first :data:`WARMUP_BARS` bars of any history.
    """
    cfg = config or default_config()
    point = cfg.symbol_spec.point
    idx = candles.index
    o = candles["open"].astype(np.float64)
    h = candles["high"].astype(np.float64)
    lo = candles["low"].astype(np.float64)
    c = candles["close"].astype(np.float64)
    vol = candles["tick_volume"].astype(np.float64)
    spread = candles["spread"].astype(np.float64) * point

    logc = np.log(c)
    r1 = logc.diff()
    prev_c = c.shift(1)
    tr = pd.concat([h - lo, (h - prev_c).abs(), (lo - prev_c).abs()], axis=1).max(axis=1, skipna=False)
    tr.iloc[:1] = (h - lo).iloc[:1]
    atr = tr.rolling(14, min_periods=14).mean()
    sma20 = c.rolling(20, min_periods=20).mean()
    sma50 = c.rolling(50, min_periods=50).mean()
    std20 = c.rolling(20, min_periods=20).std()
    hh20 = h.rolling(20, min_periods=20).max()
    ll20 = lo.rolling(20, min_periods=20).min()
    rv16 = r1.rolling(16, min_periods=16).std()
    rv96 = r1.rolling(96, min_periods=96).std()
    lv = np.log1p(vol)
    lv_mean = lv.rolling(96, min_periods=96).mean()
    lv_std = lv.rolling(96, min_periods=96).std()
    sp_mean = spread.rolling(96, min_periods=96).mean()

    f: dict[str, pd.Series | np.ndarray] = {
        "ret_1": r1,
        "ret_4": logc.diff(4),
        "ret_16": logc.diff(16),
        "ret_64": logc.diff(64),
        "atr": atr,
        "atr_pct": atr / c,
        "rv_16": rv16,
        "rv_96": rv96,
        "vol_ratio": rv16 / rv96,
        "dist_sma20_atr": (c - sma20) / atr,
        "dist_sma50_atr": (c - sma50) / atr,
        "sma20_slope_atr": (sma20 - sma20.shift(4)) / atr,
        "rsi_14": _rsi(c, 14),
        "bb_z_20": (c - sma20) / std20,
        "range_pos_20": (c - ll20) / (hh20 - ll20),
        "body_atr": (c - o) / atr,
        "upper_wick_atr": (h - np.maximum(o, c)) / atr,
        "lower_wick_atr": (np.minimum(o, c) - lo) / atr,
        "vol_rel_96": lv - lv_mean,
        "vol_z_96": (lv - lv_mean) / lv_std,
        "spread_atr": spread / atr,
        "spread_rel_96": spread / sp_mean,
    }
    for prefix, rule, lags in (("h1", "1h", (1, 4)), ("h4", "4h", (1, 6))):
        ctx = _htf(c, rule, lags, idx)
        f[f"{prefix}_ret_1"] = ctx["ret_1"]
        f[f"{prefix}_ret_{lags[1]}"] = ctx["ret_n"]
        f[f"{prefix}_dist_sma20"] = ctx["dist"]
        f[f"{prefix}_rsi_14"] = ctx["rsi"]

    f.update(session_flags(idx))
    hour = idx.hour.to_numpy() + idx.minute.to_numpy() / 60.0
    dow = idx.day_of_week.to_numpy() + hour / 24.0
    f["hour_sin"] = np.sin(2 * np.pi * hour / 24.0)
    f["hour_cos"] = np.cos(2 * np.pi * hour / 24.0)
    f["dow_sin"] = np.sin(2 * np.pi * dow / 7.0)
    f["dow_cos"] = np.cos(2 * np.pi * dow / 7.0)
    f.update(_news(idx, _load_calendar(cfg.features.calendar_csv), cfg.features.news_blackout_minutes))

    names = feature_names(cfg)
    mat = np.empty((len(idx), len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        col = f[name]
        arr = col.to_numpy(dtype=np.float64) if isinstance(col, pd.Series) else np.asarray(col, dtype=np.float64)
        mat[:, j] = arr
    mat[~np.isfinite(mat)] = np.nan
    return pd.DataFrame(mat, index=idx, columns=names)


# ------------------------------------------------------------------------------------------ the live bot's path
_CALENDAR_CACHE: dict[tuple[str, int], np.ndarray] = {}


def _calendar_cached(path: str | None) -> np.ndarray:
    """:func:`_load_calendar`, read again only when the file changes (the live bot asks once per bar)."""
    if not path:
        return np.empty(0, dtype=np.int64)
    try:
        key = (str(path), Path(path).stat().st_mtime_ns)
    except OSError:
        return _load_calendar(path)  # raises the one-line error
    got = _CALENDAR_CACHE.get(key)
    if got is None:
        _CALENDAR_CACHE.clear()
        got = _CALENDAR_CACHE[key] = _load_calendar(path)
    return got


def _tail_mean(x: np.ndarray, n: int, end: int | None = None) -> float:
    """Mean of the ``n`` values ending at position ``end`` (default: the last), NaN when fewer exist (pandas'
    ``rolling(n, min_periods=n).mean()`` at that row)."""
    end = x.size if end is None else end
    return float(np.mean(x[end - n:end])) if end >= n else np.nan


def _tail_std(x: np.ndarray, n: int) -> float:
    return float(np.std(x[-n:], ddof=1)) if x.size >= n else np.nan


def _rsi_last(close: np.ndarray, n: int) -> float:
    """Cutler's RSI of the last value (:func:`_rsi` at the last row)."""
    if close.size < n + 1:
        return np.nan
    d = np.diff(close[-(n + 1):])
    up = float(np.mean(np.clip(d, 0.0, None)))
    dn = float(np.mean(-np.clip(d, None, 0.0)))
    return 100.0 * up / (up + dn) if up + dn != 0.0 else np.nan


def _htf_last(t_ns: np.ndarray, close: np.ndarray, span_ns: int, lag_n: int) -> tuple[float, float, float, float]:
    """:func:`_htf` at the last row only: (ret_1, ret_n, dist, rsi) of the last completed higher-timeframe bar."""
    bucket = t_ns // span_ns * span_ns  # UTC-epoch aligned, like resample's midnight origin for 1h / 4h
    ends = np.flatnonzero(np.diff(bucket) != 0)
    last_idx = np.append(ends, bucket.size - 1)
    labels, htf = bucket[last_idx], close[last_idx]
    key = (t_ns[-1] + _BAR.value) // span_ns * span_ns - span_ns
    j = int(np.searchsorted(labels, key, side="right")) - 1
    if j < 0:
        return np.nan, np.nan, np.nan, np.nan
    c = htf[:j + 1]
    logc = np.log(c)
    ret_1 = float(logc[-1] - logc[-2]) if j >= 1 else np.nan
    ret_n = float(logc[-1] - logc[-1 - lag_n]) if j >= lag_n else np.nan
    sma = _tail_mean(c, 20)
    dist = float((c[-1] - sma) / sma) if np.isfinite(sma) else np.nan
    return ret_1, ret_n, dist, _rsi_last(c, 14)


def last_row(candles: pd.DataFrame, config: Config | None = None, atr_tail: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The LAST row of :func:`build_features` on ``candles``, and its ``atr`` column's last ``atr_tail`` values.

    Why: the live bot needs one row per bar; rebuilding every row of an 880-bar window with pandas costs several
    milliseconds, this a fraction of one. It computes the same formulas on only the tail slices the last row depends
    on; the values equal ``build_features(candles, config).iloc[-1]`` up to float rounding of the rolling sums (pandas
    accumulates them along the whole window, numpy sums the slice), i.e. bit-equal in float32 on nearly every bar and
    otherwise within one float32 unit (``tests/test_features_last_row.py`` checks thousands of real bars).
    Returns ``(row float32 [n_features], atr float32 [atr_tail])``.
    """
    if len(candles) == 0:
        raise ValueError("last_row needs at least one bar")
    cols = candles[["open", "high", "low", "close", "tick_volume", "spread"]].to_numpy(dtype=np.float64).T
    return last_row_arrays(candles.index.as_unit("ns").asi8, cols[0], cols[1], cols[2], cols[3], cols[4], cols[5],
                           config, atr_tail)


def last_row_arrays(t_ns: np.ndarray, o: np.ndarray, h: np.ndarray, lo: np.ndarray, c: np.ndarray, vol: np.ndarray,
                    spread_points: np.ndarray, config: Config | None = None,
                    atr_tail: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """:func:`last_row` on plain arrays (bar open times in ns since the epoch, UTC): the bot keeps its window as
    arrays, so no DataFrame is built per bar."""
    cfg = config or default_config()
    n = int(t_ns.size)
    spread = np.asarray(spread_points, dtype=np.float64) * cfg.symbol_spec.point
    with np.errstate(divide="ignore", invalid="ignore"):
        # ATR for the last atr_tail rows (true range needs the previous close; the frame's first row uses h - lo)
        k = min(n, atr_tail + 14)
        hs, ls, cs = h[n - k:], lo[n - k:], c[n - k:]
        prev = np.concatenate(([c[n - k - 1]] if n > k else [np.nan], cs[:-1]))
        tr = np.maximum(np.maximum(hs - ls, np.abs(hs - prev)), np.abs(ls - prev))
        if n <= k:
            tr[0] = hs[0] - ls[0]
        atr_vals = np.full(atr_tail, np.nan)
        if tr.size >= 14:
            means = np.lib.stride_tricks.sliding_window_view(tr, 14).mean(axis=1)[-atr_tail:]
            atr_vals[atr_tail - means.size:] = means
        atr = float(atr_vals[-1])
        logc = np.log(c[-65:]) if n >= 65 else np.log(c)
        r1 = np.diff(np.log(c[-97:])) if n >= 2 else np.empty(0)

        def ret(lag: int) -> float:
            return float(logc[-1] - logc[-1 - lag]) if n > lag else np.nan

        sma20 = _tail_mean(c, 20)
        sma20_4 = _tail_mean(c, 20, end=n - 4) if n >= 24 else np.nan
        sma50 = _tail_mean(c, 50)
        std20 = _tail_std(c, 20)
        hh20 = float(np.max(h[-20:])) if n >= 20 else np.nan
        ll20 = float(np.min(lo[-20:])) if n >= 20 else np.nan
        rv16 = _tail_std(r1, 16)
        rv96 = _tail_std(r1, 96)
        lv = np.log1p(vol[-96:])
        lv_mean = _tail_mean(lv, 96) if n >= 96 else np.nan
        lv_std = _tail_std(lv, 96) if n >= 96 else np.nan
        sp_mean = _tail_mean(spread, 96)
        cl, ol, hl, ll, spl = c[-1], o[-1], h[-1], lo[-1], spread[-1]
        f: dict[str, float] = {
            "ret_1": ret(1), "ret_4": ret(4), "ret_16": ret(16), "ret_64": ret(64),
            "atr": atr, "atr_pct": atr / cl, "rv_16": rv16, "rv_96": rv96, "vol_ratio": rv16 / rv96,
            "dist_sma20_atr": (cl - sma20) / atr, "dist_sma50_atr": (cl - sma50) / atr,
            "sma20_slope_atr": (sma20 - sma20_4) / atr, "rsi_14": _rsi_last(c, 14),
            "bb_z_20": (cl - sma20) / std20, "range_pos_20": (cl - ll20) / (hh20 - ll20),
            "body_atr": (cl - ol) / atr, "upper_wick_atr": (hl - max(ol, cl)) / atr,
            "lower_wick_atr": (min(ol, cl) - ll) / atr,
            "vol_rel_96": lv[-1] - lv_mean, "vol_z_96": (lv[-1] - lv_mean) / lv_std,
            "spread_atr": spl / atr, "spread_rel_96": spl / sp_mean,
        }
        for prefix, rule, lag_n in (("h1", "1h", 4), ("h4", "4h", 6)):
            span = pd.Timedelta(rule).value
            # 30 H4 bars at most are looked at (a halt skips buckets, so take a generous slice)
            w = min(n, (lag_n + 22) * span // _BAR.value + 8)
            r_1, r_n, dist, rsi = _htf_last(t_ns[-w:], c[-w:], span, lag_n)
            f[f"{prefix}_ret_1"], f[f"{prefix}_ret_{lag_n}"] = r_1, r_n
            f[f"{prefix}_dist_sma20"], f[f"{prefix}_rsi_14"] = dist, rsi
        last = pd.DatetimeIndex([int(t_ns[-1])], tz="UTC")
        ts = last[0]
        for name, (s_lo, s_hi) in SESSIONS.items():
            f[f"sess_{name}"] = float(s_lo <= ts.hour < s_hi)
        f["sess_overlap"] = f["sess_london"] * f["sess_new_york"]
        hour = ts.hour + ts.minute / 60.0
        dow = ts.day_of_week + hour / 24.0
        f["hour_sin"] = float(np.sin(2 * np.pi * hour / 24.0))
        f["hour_cos"] = float(np.cos(2 * np.pi * hour / 24.0))
        f["dow_sin"] = float(np.sin(2 * np.pi * dow / 7.0))
        f["dow_cos"] = float(np.cos(2 * np.pi * dow / 7.0))
        for name, v in _news(last, _calendar_cached(cfg.features.calendar_csv),
                             cfg.features.news_blackout_minutes).items():
            f[name] = float(v[0])

    row = np.array([f[name] for name in feature_names(cfg)], dtype=np.float64).astype(np.float32)
    row[~np.isfinite(row)] = np.nan
    atr_out = atr_vals.astype(np.float32)
    atr_out[~np.isfinite(atr_out)] = np.nan
    return row, atr_out
