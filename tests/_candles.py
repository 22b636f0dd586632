"""Test helper: the real BTC candles from ../shared/data as a standard candle frame (read-only, never copied)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
REAL_BTC = REPO.parent / "shared" / "data" / "BTCUSDT_15m_2023_2024.csv"


@lru_cache(maxsize=1)
def _real_btc() -> pd.DataFrame:
    from core.config import default_config

    df = pd.read_csv(REAL_BTC)
    df.index = pd.DatetimeIndex(pd.to_datetime(df.pop("timestamp_utc"), utc=True), name="time")
    df["tick_volume"] = df["volume"]
    df["real_volume"] = df.pop("volume")
    df["spread"] = default_config().costs.default_spread_points
    return df[["open", "high", "low", "close", "tick_volume", "spread", "real_volume"]].astype("float64")


def real_btc(n: int | None = None) -> pd.DataFrame:
    """A copy of the real BTC frame (optionally only the first ``n`` bars)."""
    df = _real_btc()
    return (df if n is None else df.iloc[:n]).copy()
