"""Validation rules and the refresh script's promise: bad data -> one line naming file, line, timestamp and rule,
exit code 2, data/ and config.json byte-identical. Each bad input is its own test and runs the real script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.config import default_config, load_config, parse_config
from core.errors import UserError
from core.paths import Paths
from market.data import load_candles, refresh
from market.data.store import read_store, store_path
from market.data.validate import Gap, validate

REPO = Path(__file__).resolve().parent.parent
N = 300
START = pd.Timestamp("2024-01-01 00:00", tz="UTC")


def good_frame(n: int = N, seed: int = 1) -> pd.DataFrame:
    """A small, valid 24/7 M15 series in the plain-CSV layout of the shared BTC file."""
    rng = np.random.default_rng(seed)
    close = np.round(40_000 * np.exp(np.cumsum(rng.normal(0, 0.002, n))), 2)
    open_ = np.r_[40_000.0, close[:-1]]
    return pd.DataFrame(
        {
            "timestamp_utc": pd.date_range(START, periods=n, freq="15min").strftime("%Y-%m-%d %H:%M:%S"),
            "open": open_,
            "high": np.maximum(open_, close) + 5.0,
            "low": np.minimum(open_, close) - 5.0,
            "close": close,
            "volume": np.round(rng.uniform(1, 10, n), 4),
        }
    )


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False, lineterminator="\n")
    return path


def ts(i: int) -> str:
    """The timestamp text of good_frame's row i, as messages print it."""
    return f"{START + pd.Timedelta(minutes=15 * i):%Y-%m-%d %H:%M} UTC"


@pytest.fixture
def stored_root(tmp_root: Path, tmp_path: Path) -> Path:
    """A root whose store already holds the good series (so 'untouched' means something)."""
    good = write_csv(good_frame(), tmp_path / "good.csv")
    refresh(load_config(tmp_root / "config.json"), Paths.of(tmp_root), data_path=good)
    assert store_path(Paths.of(tmp_root), load_config(tmp_root / "config.json")).exists()
    return tmp_root


def run_refresh(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "refresh_data.py"), "--root", str(root), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_rejected(root: Path, bad: Path, snapshot, *fragments: str) -> str:
    """Run the script on ``bad``: exit 2, one error line holding every fragment, root byte-identical."""
    before = snapshot(root)
    res = run_refresh(root, "--data", str(bad))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"
    assert res.stdout == ""
    assert snapshot(root) == before
    return lines[0]


# ------------------------------------------------------------------------------------ bad input, one test each
def test_unsorted_rows_stop(stored_root: Path, tmp_path: Path, snapshot) -> None:
    df = good_frame()
    df.iloc[[100, 101]] = df.iloc[[101, 100]].to_numpy()
    bad = write_csv(df, tmp_path / "unsorted.csv")
    assert_rejected(
        stored_root, bad, snapshot, str(bad), f"line 103 ({ts(100)})", f"rows not sorted by time: comes after {ts(101)}"
    )


def test_duplicate_rows_dropped_with_warning(stored_root: Path, tmp_path: Path, snapshot) -> None:
    cfg = load_config(stored_root / "config.json")
    target = store_path(Paths.of(stored_root), cfg)
    clean = write_csv(good_frame(), tmp_path / "candles.csv")
    refresh(cfg, Paths.of(stored_root), data_path=clean)  # the store as the clean file gives it
    before = snapshot(stored_root)
    df = good_frame()
    dup = pd.concat([df.iloc[:121], df.iloc[120:121], df.iloc[121:]], ignore_index=True)
    write_csv(dup, clean)  # same path, one row repeated
    res = run_refresh(stored_root, "--data", str(clean))
    assert res.returncode == 0, res.stderr
    assert "duplicates dropped: 1" in res.stdout
    assert (
        f"warning: {clean}: line 122 ({ts(120)}): dropped 1 duplicate row(s) identical to the next row" in res.stdout
    )
    assert f"rows: {N}" in res.stdout
    assert snapshot(stored_root) == before  # the store holds exactly the de-duplicated (= clean) series
    assert len(read_store(target)) == N


def test_conflicting_duplicate_is_refused_naming_both_rows(stored_root: Path, tmp_path: Path, snapshot) -> None:
    df = good_frame()
    twin = df.iloc[[50]].copy()
    twin["close"] = twin["close"] * 0.5  # a second row for the same bar, at -50%
    twin["low"] = twin["close"]
    dup = pd.concat([df.iloc[:51], twin, df.iloc[51:]], ignore_index=True)
    bad = write_csv(dup, tmp_path / "d.csv")
    assert_rejected(stored_root, bad, snapshot, f"{bad}: line 52 ({ts(50)}) and line 53 ({ts(50)})",
                    "two rows for the same time with different values", "close=")


def test_bar_in_the_future_stops(stored_root: Path, tmp_path: Path, snapshot) -> None:
    df = good_frame()
    df["timestamp_utc"] = pd.date_range("2099-01-01", periods=N, freq="15min").strftime("%Y-%m-%d %H:%M:%S")
    bad = write_csv(df, tmp_path / "future.csv")
    assert_rejected(stored_root, bad, snapshot, f"{bad}: line 2 (2099-01-01 00:00 UTC): bar in the future")
    now = START + pd.Timedelta(minutes=15 * 100)  # the clock of validate(): one bar of slack, not more
    frame = good_frame().set_index(pd.date_range(START, periods=N, freq="15min", tz="UTC"))
    frame = frame.drop(columns="timestamp_utc").rename(columns={"volume": "tick_volume"})
    frame["real_volume"], frame["spread"] = 0.0, 0.0
    validate(frame.iloc[:102], default_config(), "x", now=now)
    with pytest.raises(UserError, match=r"x: row 103 \(2024-01-02 01:30 UTC\): bar in the future"):
        validate(frame.iloc[:103], default_config(), "x", now=now)


def test_high_below_low_stops(stored_root: Path, tmp_path: Path, snapshot) -> None:
    df = good_frame()
    df.loc[50, "high"] = df.loc[50, "low"] - 10.0
    bad = write_csv(df, tmp_path / "hl.csv")
    high, low = df.loc[50, "high"], df.loc[50, "low"]
    assert_rejected(
        stored_root, bad, snapshot, str(bad), f"line 52 ({ts(50)})", f"high < low (high={high:.10g}, low={low:.10g})"
    )


def test_zero_price_stops(stored_root: Path, tmp_path: Path, snapshot) -> None:
    df = good_frame()
    df.loc[70, "open"] = 0.0
    bad = write_csv(df, tmp_path / "zero.csv")
    assert_rejected(stored_root, bad, snapshot, str(bad), f"line 72 ({ts(70)})", "open=0: prices must be > 0")


def test_nan_stops(stored_root: Path, tmp_path: Path, snapshot) -> None:
    df = good_frame()
    df["close"] = df["close"].astype(object)
    df.loc[80, "close"] = ""
    bad = write_csv(df, tmp_path / "nan.csv")
    assert_rejected(stored_root, bad, snapshot, str(bad), f"line 82 ({ts(80)})", "close is NaN", "NaN is not allowed")


def test_six_hour_gap_stops(stored_root: Path, tmp_path: Path, snapshot) -> None:
    df = good_frame().drop(index=range(150, 173)).reset_index(drop=True)  # 149 -> 173: 24 steps = 360 min
    bad = write_csv(df, tmp_path / "gap.csv")
    assert_rejected(
        stored_root,
        bad,
        snapshot,
        str(bad),
        f"line 152 ({ts(173)})",
        f"gap of 360 minutes after {ts(149)} exceeds data.max_gap_minutes=120",
    )


def test_truncated_file_stops(stored_root: Path, tmp_path: Path, snapshot) -> None:
    bad = write_csv(good_frame(), tmp_path / "t.csv")
    cut = bad.read_text()[:-30]  # cut inside the last line, as an interrupted download leaves it
    bad.write_text(cut)
    fields = len(cut.rsplit("\n", 1)[1].split(","))
    assert fields < 6
    assert_rejected(
        stored_root, bad, snapshot, str(bad), f"line {N + 1}", f"truncated file: the last line has {fields} of 6 fields"
    )


def test_wrong_columns_stop(stored_root: Path, tmp_path: Path, snapshot) -> None:
    df = good_frame().rename(columns={"timestamp_utc": "when", "open": "first", "close": "last"})
    bad = write_csv(df, tmp_path / "cols.csv")
    assert_rejected(
        stored_root,
        bad,
        snapshot,
        str(bad),
        "wrong columns: missing time (or timestamp/timestamp_utc/date), open, close",
        "found: when, first, high, low, last, volume",
    )


# ---------------------------------------------------------------------------------------- rules, in-process
@pytest.fixture
def cfg():
    return default_config()


def _frame(df: pd.DataFrame, cfg, tmp_path: Path, name: str = "x.csv") -> pd.DataFrame:
    from market.data.sources import read_file

    return read_file(write_csv(df, tmp_path / name), cfg)


def test_off_grid_timestamp_stops(cfg, tmp_path: Path) -> None:
    df = good_frame()
    df.loc[10, "timestamp_utc"] = "2024-01-01 02:31:00"
    with pytest.raises(UserError, match=r"line 12 \(2024-01-01 02:31 UTC\): timestamp not on the 15-minute grid"):
        validate(_frame(df, cfg, tmp_path), cfg, "x.csv")


def test_negative_volume_stops(cfg, tmp_path: Path) -> None:
    df = good_frame()
    df.loc[5, "volume"] = -1.0
    with pytest.raises(UserError, match=r"line 7 .*tick_volume=-1: must be >= 0"):
        validate(_frame(df, cfg, tmp_path), cfg, "x.csv")


def test_gap_at_limit_kept_one_bar_more_stops(cfg, tmp_path: Path) -> None:
    kept, report = validate(_frame(good_frame().drop(index=range(100, 107)), cfg, tmp_path), cfg, "x")  # 120 min
    assert report.gaps == [
        Gap(START + pd.Timedelta(minutes=15 * 99), START + pd.Timedelta(minutes=15 * 107), 120, "gap")
    ]
    assert report.gaps[0].missing_bars == 7
    assert len(kept) == N - 7
    with pytest.raises(UserError, match="gap of 135 minutes"):
        validate(_frame(good_frame().drop(index=range(100, 108)), cfg, tmp_path), cfg, "x")


def test_weekend_rules(cfg, tmp_path: Path) -> None:
    raw = cfg.model_dump(mode="json")
    raw["data"]["market_closures"] = "weekends"
    wk = parse_config(raw)
    df = good_frame(n=96 * 14)  # Mon 2024-01-01 .. Sun 2024-01-14
    t = pd.to_datetime(df["timestamp_utc"])
    fx = df[~t.dt.day_of_week.isin([5, 6]) & ~((t.dt.day_of_week == 4) & (t.dt.hour >= 22))].reset_index(drop=True)
    tf = pd.to_datetime(fx["timestamp_utc"])
    fx = fx[~((tf >= "2024-01-03 06:00") & (tf < "2024-01-03 12:00"))]  # a Wednesday outage
    _, report = validate(_frame(fx.reset_index(drop=True), wk, tmp_path), wk, "fx")
    assert [(g.kind, g.minutes) for g in report.gaps] == [("closure", 375), ("weekend", 3015)]
    assert str(report.gaps[1]) == "2024-01-05 21:45 UTC +3015 min (weekend)"
    assert report.unexpected_gaps == []
    with pytest.raises(UserError, match="gap of 375 minutes .* exceeds data.max_gap_minutes=120"):
        validate(_frame(fx.reset_index(drop=True), cfg, tmp_path), cfg, "fx")  # 24/7 rules: a weekend is a hole


def test_spike_flagged_and_kept(cfg, tmp_path: Path) -> None:
    df = good_frame()
    df.loc[200, ["close", "high"]] = [df.loc[200, "open"] * 1.2, df.loc[200, "open"] * 1.2 + 5]
    df.loc[201, ["open", "high"]] = [df.loc[200, "close"], df.loc[200, "close"] + 5]
    kept, report = validate(_frame(df, cfg, tmp_path), cfg, "x")
    assert START + pd.Timedelta(minutes=15 * 200) in report.spike_times
    assert START + pd.Timedelta(minutes=15 * 201) in report.spike_times  # the fall back is a spike too
    assert report.spikes == 2
    assert len(kept) == N and kept["close"].iloc[200] == pytest.approx(df.loc[200, "close"])


def test_history_days_keeps_most_recent(cfg, real_btc: Path) -> None:
    raw = cfg.model_dump(mode="json")
    raw["data"]["history_days"] = 30
    short = parse_config(raw)
    frame = load_candles(short, Paths.of(REPO), data_path=real_btc)
    assert len(frame) == 30 * 96
    assert frame.index[-1] == pd.Timestamp("2024-12-31 23:45", tz="UTC")
    assert frame.index[0] == pd.Timestamp("2024-12-02 00:00", tz="UTC")
