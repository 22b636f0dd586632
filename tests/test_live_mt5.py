"""The live bot's MT5 paths through the real ``mt5linux`` client against the stand-in terminal (rpyc_classic).

Bars are real BTC M15 bars re-stamped to the last days (the feed asks for "now minus the window"), served as
explicit rows that arrive over time (``_standin_release``). ``--live``: an entry goes out as order_check +
order_send with stop, target and the magic number, and a restart reconciles with the terminal's positions. A bad feed
(duplicate, broken prices, out of order, missing bars, a terminal that stops answering) gives one log line and an
alert per problem, no decision on the bad bar, and the bot keeps running.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import rpyc
from _candles import real_btc

from core.config import config_to_json, default_config, parse_config
from core.paths import Paths
from ops.bot.broker import MT5Broker
from ops.bot.feed import MT5Feed
from ops.bot.runner import Bot, BotOptions

REPO = Path(__file__).resolve().parent.parent
STANDIN = REPO / "tests" / "standins" / "mt5_terminal"
MAGIC = 777_001


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def terminal():  # noqa: ANN201
    port = _free_port()
    exe = Path(sys.executable).parent / "rpyc_classic"
    env = {**os.environ, "PYTHONPATH": str(STANDIN)}
    proc = subprocess.Popen([str(exe), "--host", "127.0.0.1", "-p", str(port), "-q"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conn = None
    try:
        deadline = time.monotonic() + 30
        while conn is None:
            try:
                conn = rpyc.classic.connect("127.0.0.1", port)
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield port, conn.modules["MetaTrader5"]
    finally:
        if conn is not None:
            conn.close()
        proc.terminate()
        proc.wait(timeout=10)


def _rows(n: int) -> list[tuple]:
    """``n`` real bars (from bar 20,000 of the file) re-stamped so that the last one closed an hour ago."""
    c = real_btc(20_000 + n).iloc[20_000:]
    end = (pd.Timestamp.now(tz="UTC").floor("15min") - pd.Timedelta(hours=1)).value // 10**9
    times = [end - 900 * (n - 1 - i) for i in range(n)]
    return [(t, r.open, r.high, r.low, r.close, int(r.tick_volume), 1500) for t, r in zip(times, c.itertuples(),
                                                                                           strict=True)]


def _setup(tmp_path: Path, port: int, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    raw = json.loads(config_to_json(default_config()))
    raw["data"]["mt5_port"] = port
    (root / "config.json").write_text(json.dumps(raw))
    monkeypatch.setenv("MT5_LOGIN", "1234567")
    monkeypatch.setenv("MT5_PASSWORD", "secret-pass")
    monkeypatch.setenv("MT5_SERVER", "Standin-Server")
    return root


def _bot(root: Path, mode: str) -> Bot:
    cfg = parse_config(json.loads((root / "config.json").read_text()))
    opts = BotOptions(mode=mode, state_dir=root / "state", poll_seconds=0.05, rule_signal=True, fsync=False)
    bot = Bot(Paths.of(root), MT5Feed(cfg), opts, broker=MT5Broker(cfg, MAGIC) if mode == "live" else None)
    bot.start()
    return bot


def test_live_orders_and_reconcile_through_mt5linux(terminal, tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    port, mt5 = terminal
    mt5._standin_configure()
    rows = _rows(1100)
    mt5._standin_set_rows(rows, visible=900)
    root = _setup(tmp_path, port, monkeypatch)
    bot = _bot(root, "live")
    assert "the terminal holds 0 position(s)" in capsys.readouterr().out
    sent = None
    while sent is None and mt5._standin_release(1) is None and bot.processed < 200:
        bot.opts.max_bars = bot.processed + 1
        bot.run()
        line = bot.journal.read(bot.last.time.strftime("%Y-%m-%d"))[-1]
        sent = next((f for f in line["fills"] if f["kind"] == "broker_entry"), None)
    assert sent is not None and sent["ok"], sent
    positions = [tuple(p) for p in rpyc.classic.obtain(mt5._standin_positions())]
    assert len(positions) == 1
    ticket, _, typ, magic, _, volume, price, sl, tp = positions[0][:9]
    side = 1 if typ == 0 else -1
    assert magic == MAGIC and side == line["order"]["side"] and volume == pytest.approx(line["order"]["size"])
    assert side * (price - sl) == pytest.approx(line["order"]["sl_dist"], abs=0.01)
    assert side * (tp - price) == pytest.approx(line["order"]["tp_dist"], abs=0.01)
    calls = [c[0] for c in rpyc.classic.obtain(mt5._standin_calls())]
    assert calls.index("order_check") < calls.index("order_send")

    # a restart reconciles with the terminal: our position (magic number) is found and named
    bot2 = _bot(root, "live")
    out = capsys.readouterr().out
    assert f"the terminal holds 1 position(s) with magic {MAGIC}: #{ticket}" in out
    assert bot2.trader.state.to_dict() == bot.trader.state.to_dict()


def test_bad_feed_is_refused_with_an_alert_and_the_bot_keeps_running(terminal, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    port, mt5 = terminal
    mt5._standin_configure()
    rows = _rows(1000)
    good, r1, r2, r3, r4, r5 = rows[:-5], *rows[-5:]
    dup = (r1[0], r1[1], r1[2], r1[3], r1[4] + 7.0, r1[5], r1[6])  # same time, another close
    broken = (r2[0], r2[1], r2[3] - 50.0, r2[3], r2[4], r2[5], r2[6])  # high < low
    feed = [*good, r1, dup, broken, r4, r3, r5]  # r3 arrives after r4: out of order; r2 only broken: a gap
    mt5._standin_set_rows(feed, visible=len(good))
    root = _setup(tmp_path, port, monkeypatch)
    bot = _bot(root, "shadow")
    start_bar = bot.bar_no
    mt5._standin_release(6)
    bot.opts.max_bars = 3  # r1, r4, r5
    bot.run()
    lines = [json.loads(x) for p in sorted((bot.dir / "journal").glob("*.jsonl")) for x in p.read_text().splitlines()]
    used = [pd.Timestamp(x["time"]).value // 10**9 for x in lines if x["type"] == "bar"]
    assert used == [r1[0], r4[0], r5[0]]  # no decision on the duplicate, the broken bar or the late one
    assert [x["bar"] for x in lines] == [start_bar + 1, start_bar + 2, start_bar + 3]
    assert lines[1]["feed"] == "gap"
    note = (bot.dir / "notifications.md").read_text()
    for what in ("duplicated bar with different values", "inconsistent prices", "missing bar(s)", "out of order"):
        assert what in note, what

    # the terminal stops answering: one alert, retries, no crash; bars are processed again once it is back
    mt5._standin_set_mode("none")
    bot.opts.max_bars = bot.processed + 1
    th = threading.Thread(target=bot.run, daemon=True)
    th.start()
    time.sleep(1.5)
    assert th.is_alive()
    mt5._standin_set_mode("ok")
    mt5._standin_set_rows([*feed, (r5[0] + 900, *r5[1:])], visible=len(feed) + 1)
    th.join(timeout=60)
    assert not th.is_alive()
    note = (bot.dir / "notifications.md").read_text()
    assert note.count("feed unavailable") == 1  # retried several times, alerted once
    assert bot.last.time_ns // 10**9 == r5[0] + 900
