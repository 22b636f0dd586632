"""Readers (MT5 export, plain CSV/Parquet, the real shared files), the demo generator and the store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import market.data.demo as demo_mod
from core.config import default_config, parse_config
from core.errors import UserError
from core.paths import Paths
from market.data import COLUMNS, Gap, load_candles, refresh
from market.data.demo import generate
from market.data.sources import read_file
from market.data.store import merge, read_store, store_path, write_store
from market.data.validate import validate


def weekends_cfg():
    raw = default_config().model_dump(mode="json")
    raw["data"]["market_closures"] = "weekends"
    return parse_config(raw)


def assert_standard(frame: pd.DataFrame) -> None:
    assert list(frame.columns) == list(COLUMNS)
    assert (frame.dtypes == "float64").all()
    assert isinstance(frame.index, pd.DatetimeIndex) and str(frame.index.tz) == "UTC" and frame.index.name == "time"
    assert frame.index.is_monotonic_increasing and frame.index.is_unique
    assert (frame.index.asi8 % (15 * 60 * 10**9) == 0).all()


def utc(s: str) -> pd.Timestamp:
    return pd.Timestamp(s, tz="UTC")


# ----------------------------------------------------------------------------------------- the shared files
def test_mt5_export_parses_to_standard_frame(mt5_export: Path, tmp_path: Path) -> None:
    cfg = weekends_cfg()
    frame = load_candles(cfg, Paths.of(tmp_path), data_path=mt5_export)
    assert_standard(frame)
    assert len(frame) == 43_526
    assert frame.attrs == {"source": f"mt5 export {mt5_export}", "demo": False}
    # server time (Europe/Athens) -> UTC: winter UTC+2, summer UTC+3
    first = frame.iloc[0]
    assert frame.index[0] == utc("2023-01-02 05:00")  # 2023.01.02 07:00:00 on the server
    assert list(first) == [1.07016, 1.07017, 1.06909, 1.06972, 20.0, 7.0, 0.0]  # <TICKVOL> 20, <SPREAD> 7, <VOL> 0
    assert list(frame.loc[utc("2023-07-03 07:00")]) == [1.08903, 1.08910, 1.08817, 1.08824, 973.0, 0.0, 0.0]
    assert list(frame.loc[utc("2023-10-30 08:00")]) == [1.05566, 1.05567, 1.05471, 1.05499, 1566.0, 2.0, 0.0]
    assert frame.index[-1] == utc("2024-10-01 07:15")  # 2024.10.01 10:15:00

    _, report = validate(read_file(mt5_export, cfg), cfg, str(mt5_export))
    kinds = [g.kind for g in report.gaps]
    assert kinds.count("weekend") == 91 and kinds.count("closure") == 2 and kinds.count("gap") == 2
    assert [str(g) for g in report.gaps if g.kind == "closure"] == [
        "2023-12-24 23:45 UTC +1335 min (closure)",  # Christmas
        "2024-07-02 09:00 UTC +720 min (closure)",
    ]
    assert report.gaps[0] == Gap(utc("2023-01-06 21:45"), utc("2023-01-08 22:00"), 2895, "weekend")


def test_mt5_export_on_24_7_rules_stops_at_the_first_weekend(mt5_export: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_candles(default_config(), Paths.of(tmp_path), data_path=mt5_export)
    assert str(err.value) == (
        f"{mt5_export}: line 454 (2023-01-08 22:00 UTC): gap of 2895 minutes after 2023-01-06 21:45 UTC exceeds "
        "data.max_gap_minutes=120 (24/7 market; set data.market_closures='weekends' for FX/CFD hours)"
    )


def test_utf16_mt5_export_reads_the_same(mt5_export: Path, tmp_path: Path) -> None:
    head = "".join(mt5_export.read_text(encoding="utf-8").splitlines(keepends=True)[:300])
    (tmp_path / "a.csv").write_bytes(head.encode("utf-8"))
    (tmp_path / "b.csv").write_bytes(head.encode("utf-16"))  # with BOM, as some terminals save
    cfg = weekends_cfg()
    a, b = read_file(tmp_path / "a.csv", cfg), read_file(tmp_path / "b.csv", cfg)
    assert len(a) == 299
    pd.testing.assert_frame_equal(a, b)


def test_real_btc_loads_with_the_halt_reported(real_btc: Path, tmp_root: Path) -> None:
    cfg = default_config()
    paths = Paths.of(tmp_root)
    t0 = time.perf_counter()
    frame = load_candles(cfg, paths, data_path=real_btc)
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, f"loading the real BTC CSV took {elapsed:.2f} s"
    assert_standard(frame)
    assert len(frame) == 70_175
    assert (frame.index[0], frame.index[-1]) == (utc("2022-12-31 23:00"), utc("2024-12-31 23:45"))
    assert (frame["spread"] == cfg.costs.default_spread_points).all()  # no spread column: config's
    assert (frame["tick_volume"] == frame["real_volume"]).all()  # `volume` feeds both
    assert frame.loc[utc("2022-12-31 23:00"), "real_volume"] == 1881.9812

    result = refresh(cfg, paths, data_path=real_btc)
    assert result.report.gaps == [Gap(utc("2023-03-24 12:30"), utc("2023-03-24 14:00"), 90, "gap")]
    assert result.report.rows == 70_175 and result.report.duplicates_dropped == 0
    assert "gaps: 1 kept: 2023-03-24 12:30 UTC +90 min (gap)" in result.report.summary_lines()
    halt = frame.loc[utc("2023-03-24 11:30") : utc("2023-03-24 12:30")]
    assert len(halt) == 5 and (halt["real_volume"] == 0).all()  # the five zero-volume flat bars are valid
    assert (halt[["open", "high", "low", "close"]].to_numpy() == 28080.0).all()
    assert (frame["real_volume"] == 0).sum() == 5

    # the store holds it, and load_candles without a file returns it (auto source, no MT5: real store wins)
    stored = read_store(store_path(paths, cfg))
    pd.testing.assert_frame_equal(stored, frame, check_freq=False)
    again = load_candles(cfg, paths)
    pd.testing.assert_frame_equal(again, frame, check_freq=False)
    assert again.attrs["source"] == f"file {real_btc}" and again.attrs["demo"] is False


# ------------------------------------------------------------------------------------------- plain files
def _reference(n: int = 40) -> pd.DataFrame:
    idx = pd.date_range("2024-05-01 00:00", periods=n, freq="15min", tz="UTC", name="time").as_unit("ns")
    o = 60_000 + np.arange(n, dtype=float)
    return pd.DataFrame(
        {"open": o, "high": o + 3, "low": o - 2, "close": o + 1, "tick_volume": 10.0 + np.arange(n),
         "spread": 1200.0, "real_volume": 0.5 + np.arange(n)},
        index=idx,
    )  # fmt: skip


def test_plain_csv_names_are_case_insensitive_and_volume_maps(tmp_path: Path) -> None:
    cfg = default_config()
    ref = _reference()
    text = "TimeStamp;OPEN;High;low;Close;Tick_Volume;SPREAD;Real_Volume\n" + "".join(
        f"{t:%Y-%m-%dT%H:%M:%SZ};{r.open};{r.high};{r.low};{r.close};{r.tick_volume};{r.spread};{r.real_volume}\n"
        for t, r in ref.iterrows()
    )
    (tmp_path / "a.csv").write_text(text)
    pd.testing.assert_frame_equal(
        load_candles(cfg, Paths.of(tmp_path), data_path=tmp_path / "a.csv"), ref, check_freq=False
    )

    # epoch seconds under `time`, a single `volume`, no spread -> config's default spread
    b = ref.reset_index()
    b["time"] = b["time"].astype("int64") // 10**9
    b = b.rename(columns={"real_volume": "Volume"}).drop(columns=["tick_volume", "spread"])
    b.to_csv(tmp_path / "b.csv", index=False)
    got = load_candles(cfg, Paths.of(tmp_path), data_path=tmp_path / "b.csv")
    assert_standard(got)
    np.testing.assert_array_equal(got["tick_volume"], ref["real_volume"])
    np.testing.assert_array_equal(got["real_volume"], ref["real_volume"])
    assert (got["spread"] == 1500.0).all()

    # `date` with an explicit offset: converted to UTC
    c = ref.reset_index()
    c["date"] = c.pop("time").dt.tz_convert("Europe/Berlin").map(lambda t: t.isoformat())
    c.to_csv(tmp_path / "c.csv", index=False)
    got_c = load_candles(cfg, Paths.of(tmp_path), data_path=tmp_path / "c.csv")
    assert got_c.index.equals(ref.index)


def test_parquet_with_index_or_column(tmp_path: Path) -> None:
    cfg = default_config()
    ref = _reference()
    ref.to_parquet(tmp_path / "a.parquet")
    ref.reset_index().rename(columns={"time": "timestamp"}).to_parquet(tmp_path / "b.parquet")
    for name in ("a.parquet", "b.parquet"):
        got = load_candles(cfg, Paths.of(tmp_path), data_path=tmp_path / name)
        pd.testing.assert_frame_equal(got, ref, check_freq=False)
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "a.parquet").read_bytes()[:-100])
    with pytest.raises(UserError, match=r"cut.parquet: not a readable Parquet file \(truncated or not Parquet\?\)"):
        load_candles(cfg, Paths.of(tmp_path), data_path=tmp_path / "cut.parquet")


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    cfg = default_config()
    with pytest.raises(UserError, match="nope.csv: candle file not found"):
        read_file(tmp_path / "nope.csv", cfg)
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(UserError, match="e.csv: empty file"):
        read_file(tmp_path / "e.csv", cfg)
    (tmp_path / "h.csv").write_text("time,open,high,low,close\n")
    with pytest.raises(UserError, match="h.csv: no rows after the header"):
        read_file(tmp_path / "h.csv", cfg)


# ------------------------------------------------------------------------------------------------- demo
def test_demo_is_seeded_fast_and_valid() -> None:
    t0 = time.perf_counter()
    a = generate(105_120, seed=7)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"demo generation took {elapsed:.2f} s"
    b = generate(105_120, seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert not generate(2000, seed=8)["close"].equals(generate(2000, seed=7)["close"])
    assert_standard(a)
    assert a.attrs["demo"] is True and "demo" in a.attrs["source"]
    assert len(a) == 105_120 and a.index[-1] == utc("2025-12-31 23:45")
    clean, report = validate(a, default_config(), "demo")
    assert report.gaps == [] and report.duplicates_dropped == 0
    assert a["close"].min() > 5_000 and a["close"].max() < 500_000  # BTC-like level


def test_demo_statistics() -> None:
    f = generate(105_120, seed=7)
    r = np.diff(np.log(f["close"].to_numpy()))
    z = (r - r.mean()) / r.std()
    kurtosis = float(np.mean(z**4))
    assert kurtosis > 3.0 * 2  # fat tails: far above the normal's 3
    a = np.abs(r)
    for lag in (1, 96):
        assert np.corrcoef(a[:-lag], a[lag:])[0, 1] > 0.05  # volatility clustering (hours to a day)
    # intraday and weekday seasonality of volatility
    hours = f.index.hour.to_numpy()[1:]
    dow = f.index.day_of_week.to_numpy()[1:]
    assert a[hours == 15].mean() > 1.5 * a[hours == 3].mean()
    assert a[dow == 5].mean() < 0.85 * a[dow < 5].mean()
    # activity moves with volatility
    vol = pd.Series(a).rolling(96).mean().to_numpy()
    ok = ~np.isnan(vol)
    assert np.corrcoef(vol[ok], f["tick_volume"].to_numpy()[1:][ok])[0, 1] > 0.3
    assert np.corrcoef(vol[ok], f["spread"].to_numpy()[1:][ok])[0, 1] > 0.3


def test_demo_predictable_component_is_documented_and_present() -> None:
    doc = demo_mod.__doc__ or ""
    assert "predictable component" in doc and "last 4-bar return" in doc and str(demo_mod.MOMENTUM) in doc
    f = generate(105_120, seed=7)
    c = np.log(f["close"].to_numpy())
    scale = pd.Series(np.abs(np.diff(c, prepend=c[0]))).rolling(96, min_periods=96).mean().to_numpy()
    past4 = (c[4:-4] - c[:-8]) / scale[4:-4]  # the last 4-bar return at bar t, in volatility units
    next4 = (c[8:] - c[4:-4]) / scale[4:-4]  # the next 4 bars
    ok = np.isfinite(past4) & np.isfinite(next4)
    corr = np.corrcoef(past4[ok], next4[ok])[0, 1]
    assert 0.03 < corr < 0.3  # momentum: small but far beyond noise (1/sqrt(n) ~ 0.003)
    shuffled = generate(105_120, seed=11)  # another seed shows the same effect: it is the model, not luck
    c2 = np.log(shuffled["close"].to_numpy())
    s2 = pd.Series(np.abs(np.diff(c2, prepend=c2[0]))).rolling(96, min_periods=96).mean().to_numpy()
    p2, n2 = (c2[4:-4] - c2[:-8]) / s2[4:-4], (c2[8:] - c2[4:-4]) / s2[4:-4]
    ok2 = np.isfinite(p2) & np.isfinite(n2)
    assert np.corrcoef(p2[ok2], n2[ok2])[0, 1] > 0.03


def test_demo_refresh_uses_its_own_store(tmp_root: Path) -> None:
    cfg = default_config()
    paths = Paths.of(tmp_root)
    res = refresh(cfg, paths, demo=True)
    assert (
        res.is_demo and res.stored == store_path(paths, cfg, demo=True) and res.stored.name == "BTCUSD_M15_DEMO.parquet"
    )
    assert not store_path(paths, cfg).exists()  # real history is never overwritten by the demo
    loaded = load_candles(cfg, paths)  # auto, no MT5, no file, no real store: the demo store
    assert loaded.attrs["demo"] is True
    pd.testing.assert_frame_equal(loaded, res.frame, check_freq=False)
    pd.testing.assert_frame_equal(load_candles(cfg, paths, demo=True), res.frame, check_freq=False)


# ------------------------------------------------------------------------------------------------ store
def test_store_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data" / "X_M15.parquet"
    ref = _reference()
    ref.attrs = {"source": "file x.csv", "demo": False}
    write_store(target, ref)
    old = target.read_bytes()
    back = read_store(target)
    pd.testing.assert_frame_equal(back, ref, check_freq=False)
    assert back.attrs["source"] == "file x.csv" and back.attrs["demo"] is False

    import market.data.store as store_mod

    real_write = store_mod.pq.write_table

    def dying_write(table, where, **kw):  # a stand-in for a full disk halfway through the write
        where.write(b"PAR1 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.pq, "write_table", dying_write)
    with pytest.raises(OSError, match="No space left"):
        write_store(target, _reference(80))
    assert target.read_bytes() == old
    assert os.listdir(target.parent) == [target.name]  # no temp file left behind
    monkeypatch.setattr(store_mod.pq, "write_table", real_write)


def test_merge_new_bars_win(tmp_path: Path) -> None:
    ref = _reference(20)
    old, new = ref.iloc[:12].copy(), ref.iloc[10:].copy()
    new.loc[new.index[0], "close"] = 1.0  # a corrected bar
    new.attrs = {"source": "mt5 BTCUSD M15 (x)", "demo": False}
    merged = merge(old, new)
    assert merged.index.equals(ref.index)
    assert merged.loc[ref.index[10], "close"] == 1.0
    assert merged.attrs["source"] == "mt5 BTCUSD M15 (x)"
