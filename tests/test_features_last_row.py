"""The live bot's last-row feature path equals the last row of ``build_features`` on the same window (real bars).

Why it matters: the bot computes one row per bar with :func:`market.features.last_row`; the backtest computes all rows
with :func:`market.features.build_features`. If they differed, live and backtest would trade different strategies.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from _candles import real_btc

from backtest.live import HISTORY_BARS
from backtest.policy import VOL_REGIME_BARS
from core.config import default_config, with_trading  # noqa: F401
from market.features import build_features, feature_names, last_row

HALT = pd.Timestamp("2023-03-24 12:00", tz="UTC")  # the real file's 90-minute halt is that afternoon


def _positions(index: pd.DatetimeIndex) -> list[int]:
    """Short windows at the start (warm-up NaNs), every 160th bar of a long stretch, and every bar around the halt."""
    h = int(index.searchsorted(HALT))
    return sorted({*range(1, 200, 3), *range(HISTORY_BARS, 28_000, 160), *range(h - 8, h + 40)})


def test_last_row_equals_build_features_on_thousands_of_real_bars() -> None:
    cfg = default_config()
    candles = real_btc(30_000)
    full = build_features(candles, cfg).to_numpy()
    names = feature_names(cfg)
    exact = checked = 0
    for t in _positions(candles.index):
        win = candles.iloc[max(0, t - HISTORY_BARS + 1):t + 1]
        ref = build_features(win, cfg)
        row, atr = last_row(win, cfg, atr_tail=VOL_REGIME_BARS)
        want = ref.to_numpy()[-1]
        assert row.dtype == np.float32 and row.shape == (len(names),)
        nan_diff = [names[j] for j in np.flatnonzero(np.isnan(row) != np.isnan(want))]
        assert not nan_diff, (t, nan_diff)
        np.testing.assert_allclose(row, want, rtol=2e-7, atol=1e-12, equal_nan=True, err_msg=str(t))
        ref_atr = ref["atr"].to_numpy()[-VOL_REGIME_BARS:]
        np.testing.assert_allclose(atr[-ref_atr.size:], ref_atr, rtol=2e-7, equal_nan=True, err_msg=str(t))
        exact += bool(np.array_equal(row, want, equal_nan=True))
        checked += 1
    assert checked > 250 and exact >= 0.99 * checked  # bit-equal almost always; otherwise within one float32 unit

    # thousands of consecutive real bars against the full history's rows (= build_features(candles[:t + 1])[-1] by
    # prefix invariance), each from the bot's bounded window
    exact = 0
    span = range(HISTORY_BARS, HISTORY_BARS + 3000)
    for t in span:
        row, _ = last_row(candles.iloc[t - HISTORY_BARS + 1:t + 1], cfg)
        np.testing.assert_allclose(row, full[t], rtol=2e-7, atol=1e-12, equal_nan=True, err_msg=str(t))
        exact += bool(np.array_equal(row, full[t], equal_nan=True))
    assert exact >= 0.99 * len(span)


def test_last_row_uses_the_calendar_and_sessions(tmp_path) -> None:  # noqa: ANN001
    cal = tmp_path / "cal.csv"
    cal.write_text("time_utc,currency,impact,event\n2023-01-10T13:30:00Z,USD,high,CPI\n"
                   "2023-01-10T15:00:00Z,USD,low,Other\n")
    cfg = default_config().model_copy(update={"features": default_config().features.model_copy(
        update={"calendar_csv": str(cal)})})
    candles = real_btc(1200)
    for t in range(860, 1000, 7):  # around 2023-01-10 13:30
        win = candles.iloc[:t + 1]
        row, _ = last_row(win, cfg)
        np.testing.assert_allclose(row, build_features(win, cfg).to_numpy()[-1], rtol=2e-7, equal_nan=True)
