"""Nothing lost: the candle store only grows. A run option never trims it, a shorter or later file is merged into
it (and refused when it contradicts it), an oversized Parquet file is refused from its metadata, refresh_data.py
takes the root's lock, and temp files of a killed write are removed at the next start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from test_data_validate import good_frame, run_refresh, write_csv

from core.config import config_to_json, default_config, load_config, parse_config
from core.io import tmp_path_for
from core.paths import Paths, remove_stale_temp_files
from market.data import load_candles, refresh
from market.data.store import read_store, store_path


def _store(root: Path) -> pd.DataFrame:
    cfg = load_config(root / "config.json")
    out = read_store(store_path(Paths.of(root), cfg))
    assert out is not None
    return out


def _rows(df: pd.DataFrame, a: int, b: int) -> pd.DataFrame:
    return df.iloc[a:b].reset_index(drop=True)


def test_history_days_choose_what_is_used_never_what_is_kept(tmp_root: Path, tmp_path: Path) -> None:
    n = 96 * 45  # 45 days of bars
    full = write_csv(good_frame(n), tmp_path / "full.csv")
    raw = default_config().model_dump(mode="json")
    raw["data"]["history_days"] = 30  # what --quick does with its 365 days, at test size
    short = parse_config(raw)
    res = refresh(short, Paths.of(tmp_root), data_path=full)
    assert len(res.frame) == 96 * 30  # the run uses 30 days
    assert len(_store(tmp_root)) == n  # the store keeps all 45
    again = refresh(short, Paths.of(tmp_root), data_path=write_csv(good_frame(n)[-200:], tmp_path / "tail.csv"))
    assert again.new_bars == 0 and len(_store(tmp_root)) == n
    assert len(load_candles(short, Paths.of(tmp_root))) == 96 * 30


def test_shorter_or_later_file_is_merged_not_replacing_the_store(tmp_root: Path, tmp_path: Path) -> None:
    df = good_frame(800)
    cfg = load_config(tmp_root / "config.json")
    refresh(cfg, Paths.of(tmp_root), data_path=write_csv(_rows(df, 0, 600), tmp_path / "a.csv"))
    res = refresh(cfg, Paths.of(tmp_root), data_path=write_csv(_rows(df, 0, 100), tmp_path / "short.csv"))
    assert res.new_bars == 0 and len(_store(tmp_root)) == 600  # 600 stored bars do not become 100
    res = refresh(cfg, Paths.of(tmp_root), data_path=write_csv(_rows(df, 550, 800), tmp_path / "later.csv"))
    assert res.new_bars == 200
    stored = _store(tmp_root)
    assert len(stored) == 800 and stored.index.is_monotonic_increasing and stored.index.is_unique
    assert stored["close"].to_numpy().tolist() == df["close"].tolist()


def test_contradicting_file_is_refused_unless_replace(tmp_root: Path, tmp_path: Path, snapshot) -> None:
    df = good_frame(400)
    cfg = load_config(tmp_root / "config.json")
    refresh(cfg, Paths.of(tmp_root), data_path=write_csv(df, tmp_path / "a.csv"))
    other = _rows(df, 300, 400)
    other.loc[10, ["close", "high"]] = [other.loc[10, "close"] * 1.01, other.loc[10, "close"] * 1.02]
    bad = write_csv(other, tmp_path / "other.csv")
    before = snapshot(tmp_root)
    res = run_refresh(tmp_root, "--data", str(bad))
    assert res.returncode == 2, res.stdout + res.stderr
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith(f"error: {bad}: 2024-01-04 05:30 UTC: contradicts")
    assert "close=" in line and "--replace" in line and "1 of 100 overlapping bars differ" in line
    assert snapshot(tmp_root) == before
    old_bytes = (tmp_root / "data" / "BTCUSD_M15.parquet").read_bytes()
    res = run_refresh(tmp_root, "--data", str(bad), "--replace")
    assert res.returncode == 0, res.stderr
    assert len(_store(tmp_root)) == 100
    kept = list((tmp_root / "data" / "replaced").glob("BTCUSD_M15.*.parquet"))
    assert len(kept) == 1 and kept[0].read_bytes() == old_bytes  # even a replace on purpose loses nothing
    assert f"the previous store is kept as {kept[0]}" in res.stdout


def test_parquet_row_count_is_checked_from_metadata(tmp_root: Path, tmp_path: Path) -> None:
    frame = good_frame(1500)
    frame["timestamp_utc"] = pd.to_datetime(frame["timestamp_utc"], utc=True)
    big = tmp_path / "big.parquet"
    frame.to_parquet(big)
    raw = default_config().model_dump(mode="json")
    raw["data"]["max_rows"] = 1000
    (tmp_root / "config.json").write_text(config_to_json(parse_config(raw)))
    res = run_refresh(tmp_root, "--data", str(big))
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: {big}: candle file has 1,500 rows, more than data.max_rows=1,000: refused "
                                  "before reading (raise data.max_rows in config.json if this is really candle "
                                  "history)")
    assert not list((tmp_root / "data").iterdir())


def test_refresh_takes_the_root_lock(tmp_root: Path, tmp_path: Path, snapshot, lock_holder) -> None:
    holder = lock_holder(tmp_root)
    before = snapshot(tmp_root)
    res = run_refresh(tmp_root, "--data", str(write_csv(good_frame(), tmp_path / "a.csv")))
    assert res.returncode == 3, res.stderr
    assert str(holder.pid) in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert snapshot(tmp_root) == before


def test_temp_files_of_a_killed_write_are_removed_at_the_next_start(tmp_root: Path, tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path_for(tmp_root / "data" / "BTCUSD_M15.parquet", dead_pid)  # core.io's temp file naming
    stale.write_bytes(b"PAR1 half a file")
    cfg_tmp = tmp_path_for(tmp_root / "config.json", dead_pid)
    cfg_tmp.write_text("{")
    live = tmp_path_for(tmp_root / "data" / "BTCUSD_M15.parquet", os.getppid())  # a writer that is still alive
    live.write_bytes(b"in progress")
    res = run_refresh(tmp_root, "--data", str(write_csv(good_frame(), tmp_path / "a.csv")))
    assert res.returncode == 0, res.stderr
    assert not stale.exists() and not cfg_tmp.exists()
    assert live.exists()
    assert f"removed data/{stale.name}" in res.stderr
    assert remove_stale_temp_files(Paths.of(tmp_root)) == []


def test_weekly_quick_run_leaves_the_stored_history_whole(tmp_root: Path, tmp_path: Path) -> None:
    """The weekly job's data phase with --quick (365 days) on a store holding more: the store keeps every bar."""
    from ops.pipeline import RunContext, RunOptions, phase_data
    from ops.report import RunReport

    n = 96 * 400
    csv = write_csv(good_frame(n), tmp_path / "long.csv")
    paths = Paths.of(tmp_root)
    cfg = load_config(paths.config)
    refresh(cfg, paths, data_path=csv)
    run_dir = paths.results / "r1"
    run_dir.mkdir(parents=True)
    ctx = RunContext(paths=paths, run_id="r1", options=RunOptions(data=str(csv), quick=True),
                     report=RunReport(run_dir, "r1", demo=False), cfg=cfg)
    summary: dict = {}
    phase_data(ctx, summary)
    assert summary["rows"] == 96 * 365
    assert len(_store(tmp_root)) == n
