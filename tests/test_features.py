"""Features are causal (prefix invariance), bounded-memory (warm-up window) and well-formed, on real BTC data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.config import default_config
from market.features import WARMUP_BARS, build_features, feature_names
from tests._candles import real_btc


@pytest.fixture(scope="module")
def candles() -> pd.DataFrame:
    return real_btc(20_000)


@pytest.fixture(scope="module")
def full(candles: pd.DataFrame) -> pd.DataFrame:
    return build_features(candles)


def _hour_boundary_positions(index: pd.DatetimeIndex) -> list[int]:
    """k values such that the prefix ends just after an H1 and just after an H4 boundary, and mid-bar of each."""
    ks = []
    for minute, hours in ((0, 1), (15, 4), (45, 4), (0, 4)):
        pos = np.flatnonzero((index.minute == minute) & (index.hour % hours == 0))
        ks.append(int(pos[len(pos) // 2]) + 1)
    return ks


def test_prefix_invariance_exact(candles: pd.DataFrame, full: pd.DataFrame) -> None:
    ks = [WARMUP_BARS + 1, 3_333, 9_999, *_hour_boundary_positions(candles.index)]
    for k in ks:
        part = build_features(candles.iloc[:k])
        a, b = part.to_numpy(), full.iloc[:k].to_numpy()
        assert np.array_equal(np.isnan(a), np.isnan(b)), k
        np.testing.assert_array_equal(np.nan_to_num(a), np.nan_to_num(b), err_msg=f"prefix k={k}")


def test_future_bars_do_not_change_the_past(candles: pd.DataFrame, full: pd.DataFrame) -> None:
    """Perturbing bars after t (a huge spike) leaves every row <= t unchanged."""
    t = 12_345
    spiked = candles.copy()
    spiked.iloc[t + 1:, spiked.columns.get_indexer(["open", "high", "low", "close"])] *= 3.0
    out = build_features(spiked)
    np.testing.assert_array_equal(np.nan_to_num(out.iloc[: t + 1].to_numpy()),
                                  np.nan_to_num(full.iloc[: t + 1].to_numpy()))
    assert not np.allclose(np.nan_to_num(out.iloc[t + 2].to_numpy()), np.nan_to_num(full.iloc[t + 2].to_numpy()))


def test_bounded_memory_window_matches_full_history(candles: pd.DataFrame, full: pd.DataFrame) -> None:
    for t in (WARMUP_BARS + 10, 7_777, 15_000, 19_999):
        window = build_features(candles.iloc[t + 1 - WARMUP_BARS: t + 1])
        a, b = window.iloc[-1].to_numpy(), full.iloc[t].to_numpy()
        assert not np.isnan(b).any(), "after the warm-up every feature is defined"
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"t={t}")


def test_shape_dtype_and_protected_columns(candles: pd.DataFrame, full: pd.DataFrame) -> None:
    assert list(full.columns) == feature_names()
    assert full.index.equals(candles.index)
    assert (full.dtypes == np.float32).all()
    assert set(default_config().features.protected) <= set(full.columns)
    after = full.iloc[WARMUP_BARS:]
    assert not after.isna().any().any()
    # ATR is in price units and tracks the bar range
    rng = (candles["high"] - candles["low"]).rolling(14).mean().iloc[WARMUP_BARS:]
    assert np.corrcoef(after["atr"], rng)[0, 1] > 0.95
    # sessions follow the UTC hour
    h = candles.index.hour
    assert (after["sess_asia"].to_numpy() == ((h >= 0) & (h < 8))[WARMUP_BARS:]).all()


def test_news_features_from_calendar(candles: pd.DataFrame) -> None:
    cfg = default_config()
    cfg.features.calendar_csv = str(__import__("pathlib").Path(__file__).parent.parent / "examples" /
                                    "economic_calendar.csv")
    # 2024-01-11 13:30 CPI: the bar opening 13:00 decides at 13:15 -> 15 minutes to the event, in blackout
    df = real_btc()
    win = df.loc["2024-01-10":"2024-01-12"]
    f = build_features(win, cfg)
    row = f.loc[pd.Timestamp("2024-01-11 13:00", tz="UTC")]
    assert row["news_min_to_next"] == pytest.approx(15.0)
    assert row["news_blackout"] == 1.0
    after = f.loc[pd.Timestamp("2024-01-11 15:00", tz="UTC")]
    assert after["news_min_since_last"] == pytest.approx(105.0)
    assert after["news_blackout"] == 0.0
