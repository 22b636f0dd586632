"""``python bench/live_bar.py``: what one bar costs the live bot's feature path (prints figures; no assertions).

Compares :func:`market.features.last_row` (the bot, and ``Trader.step``) with rebuilding the whole
``HISTORY_BARS`` window with :func:`market.features.build_features` (what step mode did before) on real bars, and
prints step mode's bars per second with the rule-based signal.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from backtest.engine import run_step
from backtest.live import HISTORY_BARS
from backtest.policy import VOL_REGIME_BARS
from backtest.rules import RuleSignal
from core.config import default_config
from market.features import build_features, feature_names, last_row

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "BTCUSDT_15m_2023_2024.csv"


def main() -> None:
    cfg = default_config()
    df = pd.read_csv(DATA, nrows=12_000)
    df.index = pd.DatetimeIndex(pd.to_datetime(df.pop("timestamp_utc"), utc=True), name="time")
    df["tick_volume"] = df["volume"]
    df["real_volume"] = df.pop("volume")
    df["spread"] = cfg.costs.default_spread_points
    c = df[["open", "high", "low", "close", "tick_volume", "spread", "real_volume"]].astype("float64")
    ts = range(HISTORY_BARS, HISTORY_BARS + 1000)
    t0 = time.perf_counter()
    for t in ts:
        last_row(c.iloc[t - HISTORY_BARS + 1:t + 1], cfg, atr_tail=VOL_REGIME_BARS)
    fast = (time.perf_counter() - t0) / len(ts)
    t0 = time.perf_counter()
    for t in ts[:200]:
        build_features(c.iloc[t - HISTORY_BARS + 1:t + 1], cfg)
    slow = (time.perf_counter() - t0) / 200
    print(f"last_row on a {HISTORY_BARS}-bar window: {fast * 1e3:.2f} ms/bar; build_features on the window: "
          f"{slow * 1e3:.2f} ms/bar ({slow / fast:.0f}x)")
    pred = RuleSignal(feature_names(cfg))
    t0 = time.perf_counter()
    run_step(c, pred, cfg, 1000, 4000)
    dt = time.perf_counter() - t0
    print(f"step mode (Trader.step, rule signal): 3000 bars in {dt:.1f} s = {3000 / dt:.0f} bars/s")


if __name__ == "__main__":
    main()
