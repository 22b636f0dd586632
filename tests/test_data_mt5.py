"""The MT5 code path through the real ``mt5linux`` client (rpyc) against a stand-in terminal module.

The stand-in (tests/standins/mt5_terminal/MetaTrader5.py) is served by ``rpyc_classic`` in a subprocess; its bars
carry server-time epochs (Europe/Athens) and values that are a function of the UTC open time, so every assertion on
``open`` below checks the server-time -> UTC conversion bar by bar.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest
import rpyc

from core.config import config_to_json, default_config, parse_config
from core.errors import UserError
from core.paths import Paths
from market.data import mt5 as mt5data
from market.data import refresh, resolve_source
from market.data.store import read_store, store_path
from market.data.validate import validate

REPO = Path(__file__).resolve().parent.parent
STANDIN = REPO / "tests" / "standins" / "mt5_terminal"
ATHENS = ZoneInfo("Europe/Athens")
LOGIN, PASSWORD, SERVER = "1234567", "secret-pass", "Standin-Server"
MT5_DTYPE = np.dtype(
    [("time", "<i8"), ("open", "<f8"), ("high", "<f8"), ("low", "<f8"), ("close", "<f8"),
     ("tick_volume", "<u8"), ("spread", "<i4"), ("real_volume", "<u8")]
)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Terminal:
    """The running stand-in: its port and its control functions (over a second rpyc connection)."""

    def __init__(self, port: int, conn: rpyc.Connection) -> None:
        self.port, self._conn = port, conn
        self._mod = conn.modules["MetaTrader5"]

    def configure(self, **kw: object) -> None:
        self._mod._standin_configure(**kw)

    def calls(self) -> list[tuple]:
        return [tuple(c) for c in rpyc.classic.obtain(self._mod._standin_calls())]

    def server_times(self) -> list[int]:
        return list(rpyc.classic.obtain(self._mod._standin_server_times()))


@pytest.fixture(scope="module")
def terminal():
    port = _free_port()
    exe = Path(sys.executable).parent / "rpyc_classic"
    env = {**os.environ, "PYTHONPATH": str(STANDIN)}
    proc = subprocess.Popen(
        [str(exe), "--host", "127.0.0.1", "-p", str(port), "-q"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    conn = None
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"rpyc_classic exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("rpyc_classic did not accept connections within 30 s")
                time.sleep(0.05)
        conn = rpyc.classic.connect("127.0.0.1", port)
        yield Terminal(port, conn)
    finally:
        if conn is not None:
            conn.close()
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MT5_LOGIN", LOGIN)
    monkeypatch.setenv("MT5_PASSWORD", PASSWORD)
    monkeypatch.setenv("MT5_SERVER", SERVER)
    monkeypatch.delenv("MT5_PATH", raising=False)


def mt5_cfg(port: int, **data: object):
    raw = default_config().model_dump(mode="json")
    raw["data"].update({"source": "mt5", "mt5_host": "127.0.0.1", "mt5_port": port, **data})
    return parse_config(raw)


def wall_epoch(utc: pd.Timestamp) -> int:
    """The test's own server-clock rule: UTC instant -> Athens wall clock as epoch seconds."""
    local = datetime.fromtimestamp(utc.timestamp(), tz=ATHENS)
    return int(local.replace(tzinfo=UTC).timestamp())


def utc(s: str) -> pd.Timestamp:
    return pd.Timestamp(s, tz="UTC")


def expected_open(index: pd.DatetimeIndex, start: pd.Timestamp) -> np.ndarray:
    return 30000.0 + (index - start) / pd.Timedelta(minutes=15)


# ------------------------------------------------------------------------------------------------ the client
def test_standin_speaks_the_real_dtype_through_mt5linux(terminal: Terminal) -> None:
    from mt5linux import MetaTrader5

    terminal.configure(
        start_utc=int(utc("2024-06-01 00:00").timestamp()), now_utc=int(utc("2024-06-01 02:05").timestamp())
    )
    mt5 = MetaTrader5(host="127.0.0.1", port=terminal.port)
    assert (
        mt5.copy_rates_range("BTCUSD", 15, datetime(2024, 6, 1, tzinfo=UTC), datetime(2024, 6, 2, tzinfo=UTC)) is None
    )
    assert tuple(mt5.last_error()) == (-10004, "No IPC connection")
    assert mt5.initialize(login=int(LOGIN), password=PASSWORD, server=SERVER)
    arr = mt5.copy_rates_range(
        "BTCUSD", mt5.TIMEFRAME_M15, datetime(2024, 6, 1, tzinfo=UTC), datetime(2024, 6, 2, tzinfo=UTC)
    )
    mt5.shutdown()
    assert isinstance(arr, np.ndarray) and arr.dtype == MT5_DTYPE
    # summer: the server clock is UTC+3, so the first bar (00:00 UTC) is stamped 03:00
    assert int(arr["time"][0]) == int(pd.Timestamp("2024-06-01 03:00").timestamp())
    assert len(arr) == 9  # 00:00 .. 02:00 UTC, the last one still forming


# ----------------------------------------------------------------------------------------- refresh, store
def test_refresh_stores_completed_bars_and_reads_symbol_spec(terminal: Terminal, tmp_root: Path, creds) -> None:
    now = pd.Timestamp.now(tz="UTC")
    start = now.floor("15min") - pd.Timedelta(hours=48)
    terminal.configure(start_utc=int(start.timestamp()))
    cfg = mt5_cfg(terminal.port)
    assert resolve_source(cfg) == "mt5"
    result = refresh(cfg, Paths.of(tmp_root))
    after = pd.Timestamp.now(tz="UTC")

    frame = result.frame
    assert not result.is_demo and frame.attrs["demo"] is False
    assert result.source == f"mt5 BTCUSD M15 ({SERVER} via mt5linux bridge 127.0.0.1:{terminal.port})"
    assert frame.index[0] == start
    assert now.floor("15min") - pd.Timedelta(minutes=15) <= frame.index[-1] < after.floor("15min")  # no forming bar
    assert (frame.index.to_series().diff().dropna() == pd.Timedelta(minutes=15)).all()
    np.testing.assert_array_equal(frame["open"].to_numpy(), expected_open(frame.index, start))
    assert list(frame.columns) == ["open", "high", "low", "close", "tick_volume", "spread", "real_volume"]
    assert (frame.dtypes == "float64").all() and str(frame.index.tz) == "UTC" and frame.index.name == "time"
    assert result.symbol_info is not None and result.symbol_info["point"] == 0.01
    assert result.symbol_info["trade_contract_size"] == 1.0
    assert result.warnings == [  # the stand-in holds two days, not history_days: say so
        f"the terminal's history starts at {start:%Y-%m-%d %H:%M} UTC, later than the 1095 days asked for "
        "(raise 'Max bars in chart' in the terminal)"
    ]
    assert result.new_bars == len(frame) == result.report.rows

    names = [c[0] for c in terminal.calls()]
    assert names == [
        "initialize",
        "symbol_select",
        "symbol_info",
        "copy_rates_range",
        "copy_rates_from_pos",
        "shutdown",
    ]
    assert terminal.calls()[0] == ("initialize", int(LOGIN), SERVER)
    _, sym, tf, t0, t1 = terminal.calls()[3]
    assert (sym, tf) == ("BTCUSD", 15)
    assert abs(t0 - wall_epoch(now - pd.Timedelta(days=cfg.data.history_days))) < 120  # history_days back ...
    assert abs(t1 - wall_epoch(now)) < 120  # ... to now, both on the server clock
    stored = read_store(store_path(Paths.of(tmp_root), cfg))
    pd.testing.assert_frame_equal(stored, frame, check_freq=False)


def test_incremental_fetch_from_last_stored_bar(terminal: Terminal, tmp_root: Path, creds) -> None:
    start = pd.Timestamp.now(tz="UTC").floor("15min") - pd.Timedelta(hours=24)
    cfg = mt5_cfg(terminal.port)
    paths = Paths.of(tmp_root)
    terminal.configure(start_utc=int(start.timestamp()), lag_s=2 * 3600)  # the terminal is two hours behind
    first = refresh(cfg, paths).frame
    last = first.index[-1]

    terminal.configure(start_utc=int(start.timestamp()))  # caught up
    second = refresh(cfg, paths)
    rng = [c for c in terminal.calls() if c[0] == "copy_rates_range"]
    assert len(rng) == 1
    assert rng[0][3] == wall_epoch(last)  # from the last stored bar, on the server clock
    added = second.frame.index[second.frame.index > last]
    assert 7 <= len(added) <= 9 and second.new_bars == len(added)
    assert second.frame.index[0] == start and second.frame.index.is_unique
    assert (second.frame.index.to_series().diff().dropna() == pd.Timedelta(minutes=15)).all()
    np.testing.assert_array_equal(second.frame["open"].to_numpy(), expected_open(second.frame.index, start))
    pd.testing.assert_frame_equal(read_store(store_path(paths, cfg)), second.frame, check_freq=False)


# ------------------------------------------------------------------------------------------ server time / DST
def test_server_time_to_utc_across_spring_dst(terminal: Terminal, creds) -> None:
    start, now = utc("2024-03-30 22:00"), utc("2024-03-31 03:10")  # EU DST starts 2024-03-31 01:00 UTC
    terminal.configure(start_utc=int(start.timestamp()), now_utc=int(now.timestamp()))
    walls = terminal.server_times()
    jump = walls.index(int(pd.Timestamp("2024-03-31 04:00").timestamp()))
    assert walls[jump - 1] == int(pd.Timestamp("2024-03-31 02:45").timestamp())  # the server clock skips an hour

    got = mt5data.fetch(mt5_cfg(terminal.port), now=now).frame
    assert got.index.equals(pd.date_range(start, utc("2024-03-31 02:45"), freq="15min", name="time"))  # no forming bar
    np.testing.assert_array_equal(got["open"].to_numpy(), expected_open(got.index, start))
    assert got.loc[utc("2024-03-31 01:00"), "open"] == 30000 + 12  # stamped 04:00 EEST on the server
    assert got.loc[utc("2024-03-31 00:45"), "open"] == 30000 + 11  # stamped 02:45 EET


def test_server_time_to_utc_across_autumn_dst(terminal: Terminal, creds) -> None:
    start, now = utc("2024-10-26 22:00"), utc("2024-10-27 03:10")  # EU DST ends 2024-10-27 01:00 UTC
    terminal.configure(start_utc=int(start.timestamp()), now_utc=int(now.timestamp()))
    cfg = mt5_cfg(terminal.port)
    got = mt5data.fetch(cfg, now=now).frame
    first_hour = pd.date_range(start, utc("2024-10-27 00:45"), freq="15min")
    after = pd.date_range(utc("2024-10-27 02:00"), utc("2024-10-27 02:45"), freq="15min")
    assert got.index.equals(first_hour.append(after).rename("time"))
    # the server clock repeated 03:00-03:59: the terminal merged UTC 00:xx and 01:xx into one bar, opened at 00:xx
    bar = got.loc[utc("2024-10-27 00:00")]
    assert (bar["open"], bar["close"], bar["high"], bar["low"]) == (30008.0, 30012.5, 30013.5, 30007.0)
    assert bar["tick_volume"] == (100 + 8) + (100 + 12)
    assert got.loc[utc("2024-10-27 02:00"), "open"] == 30000 + 16  # stamped 04:00 EET
    assert got.loc[utc("2024-10-26 22:00"), "open"] == 30000  # stamped 01:00 EEST
    _, report = validate(got, cfg, "mt5")
    assert [(g.start, g.minutes, g.kind) for g in report.gaps] == [(utc("2024-10-27 00:45"), 75, "gap")]


# --------------------------------------------------------------------------------------- failures: no write
def _write_mt5_config(root: Path, port: int) -> None:
    (root / "config.json").write_text(config_to_json(mt5_cfg(port)), encoding="utf-8")


def test_failed_login_names_last_error_and_leaves_store(terminal: Terminal, tmp_root: Path, creds, snapshot) -> None:
    _write_mt5_config(tmp_root, terminal.port)
    start = pd.Timestamp.now(tz="UTC").floor("15min") - pd.Timedelta(hours=6)
    terminal.configure(start_utc=int(start.timestamp()))
    refresh(mt5_cfg(terminal.port), Paths.of(tmp_root))  # a store to protect
    before = snapshot(tmp_root)

    env = {**os.environ, "MT5_PASSWORD": "wrong-password"}
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "refresh_data.py"), "--root", str(tmp_root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip() == (
        f"error: MT5: initialize (login {LOGIN}, server '{SERVER}') via mt5linux bridge 127.0.0.1:{terminal.port} "
        "failed: last_error()=(-6, 'Terminal: Authorization failed')"
    )
    assert "wrong-password" not in res.stderr + res.stdout
    assert snapshot(tmp_root) == before
    assert [c[0] for c in terminal.calls()][-2:] == ["initialize", "shutdown"]


def test_empty_answer_names_last_error_and_writes_nothing(terminal: Terminal, tmp_root: Path, creds, snapshot) -> None:
    terminal.configure(start_utc=int(utc("2024-06-01").timestamp()), rates_mode="empty")
    before = snapshot(tmp_root)
    with pytest.raises(UserError, match=r"answered no bars: last_error\(\)=\(1, 'Success'\)"):
        refresh(mt5_cfg(terminal.port), Paths.of(tmp_root))
    assert snapshot(tmp_root) == before and not any((tmp_root / "data").iterdir())
    assert terminal.calls()[-1] == ("shutdown",)


def test_none_answer_names_last_error(terminal: Terminal, tmp_root: Path, creds, snapshot) -> None:
    terminal.configure(start_utc=int(utc("2024-06-01").timestamp()), rates_mode="none")
    before = snapshot(tmp_root)
    with pytest.raises(
        UserError, match=r"copy_rates_range\('BTCUSD', M15, .* failed: last_error\(\)=\(-4, 'Terminal: Not found'\)"
    ):
        refresh(mt5_cfg(terminal.port), Paths.of(tmp_root))
    assert snapshot(tmp_root) == before


def test_stale_terminal_on_24_7_symbol_stops_and_keeps_store(
    terminal: Terminal, tmp_root: Path, creds, snapshot
) -> None:
    start = pd.Timestamp.now(tz="UTC").floor("15min") - pd.Timedelta(hours=12)
    cfg = mt5_cfg(terminal.port)
    terminal.configure(start_utc=int(start.timestamp()), lag_s=4 * 3600)
    refresh(cfg, Paths.of(tmp_root))
    before = snapshot(tmp_root)
    terminal.configure(start_utc=int(start.timestamp()), rates_mode="empty")
    with pytest.raises(
        UserError, match=r"answered no new bars although the last stored bar .* minutes old on a 24/7 symbol"
    ):
        refresh(cfg, Paths.of(tmp_root))
    assert snapshot(tmp_root) == before


def test_unknown_symbol_names_last_error(terminal: Terminal, creds) -> None:
    terminal.configure()
    raw = mt5_cfg(terminal.port).model_dump(mode="json")
    raw["symbol"] = "XYZUSD"
    with pytest.raises(
        UserError, match=r"symbol_select\('XYZUSD'\) failed: last_error\(\)=\(-1, 'Terminal: Call failed'\)"
    ):
        mt5data.fetch(parse_config(raw))
    assert terminal.calls()[-1] == ("shutdown",)


def test_broker_spec_differences_are_reported(terminal: Terminal, creds) -> None:
    terminal.configure(
        start_utc=int(utc("2024-06-01").timestamp()), now_utc=int(utc("2024-06-01 06:00").timestamp()), point=0.001
    )
    got = mt5data.fetch(mt5_cfg(terminal.port), now=utc("2024-06-01 06:00"))
    assert got.symbol_info["point"] == 0.001
    assert "config.json symbol_spec.point=0.01 but the broker's point is 0.001" in got.warnings


def test_unreachable_bridge_and_missing_login(monkeypatch: pytest.MonkeyPatch, creds) -> None:
    port = _free_port()  # nothing listens there
    with pytest.raises(UserError, match=f"cannot reach the mt5linux bridge at 127.0.0.1:{port}"):
        mt5data.fetch(mt5_cfg(port))
    monkeypatch.delenv("MT5_LOGIN")
    with pytest.raises(UserError, match="MT5_LOGIN is not set"):
        mt5data.fetch(mt5_cfg(port))
    raw = default_config().model_dump(mode="json")
    assert resolve_source(parse_config(raw)) == "demo"  # auto without MT5_LOGIN or a file


def test_store_of_another_feed_is_not_mixed_with_mt5_nor_dropped(terminal: Terminal, tmp_root: Path, creds) -> None:
    """A store imported from a file is neither silently replaced by MT5 history (lost) nor extended with MT5 bars
    (two feeds mixed): one line naming --replace; with replace the old store is kept under data/replaced/."""
    from test_data_validate import good_frame, write_csv

    paths = Paths.of(tmp_root)
    cfg = mt5_cfg(terminal.port)
    refresh(cfg, paths, data_path=write_csv(good_frame(), tmp_root / "imported.csv"))
    target = store_path(paths, cfg)
    before = target.read_bytes()
    terminal.configure(start_utc=int((pd.Timestamp.now(tz="UTC").floor("15min") - pd.Timedelta(hours=6)).timestamp()))
    with pytest.raises(UserError, match=r"holds file .*imported.csv, not MT5 history of BTCUSD: .* --replace"):
        refresh(cfg, paths)
    assert target.read_bytes() == before
    res = refresh(cfg, paths, replace=True)
    assert res.source.startswith("mt5 BTCUSD M15") and len(res.frame) >= 20
    kept = list((tmp_root / "data" / "replaced").glob("BTCUSD_M15.*.parquet"))
    assert len(kept) == 1 and kept[0].read_bytes() == before
