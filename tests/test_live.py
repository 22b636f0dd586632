"""The live bot on recorded real bars: shadow run == backtest/run.py trade for trade, kill + restart == uninterrupted
run (same journal bytes), and a weekly swap with an open position (kept; a tampered set refused).

The rule-based signal keeps these runs cheap and trades often; the swap test uses tiny real models (RF/XGB/LGB
trained here on real features) because verification is about model files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _candles import real_btc

from core.config import config_to_json, default_config, parse_config
from core.paths import Paths
from ops.bot.feed import FileFeed
from ops.bot.runner import Bot, BotOptions, Journal, bar_lines, parity_backtest, parity_day

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "BTCUSDT_15m_2023_2024.csv"


def _root(tmp: Path, cfg_changes: dict | None = None) -> Path:
    root = tmp / "root"
    root.mkdir(parents=True, exist_ok=True)
    raw = json.loads(config_to_json(default_config()))
    for section, vals in (cfg_changes or {}).items():
        if isinstance(vals, dict):
            raw[section].update(vals)
        else:
            raw[section] = vals
    (root / "config.json").write_text(json.dumps(raw, indent=2))
    return root


def _bot(root: Path, state: Path, start: str, end: str, **kw) -> Bot:  # noqa: ANN003
    paths = Paths.of(root)
    feed = FileFeed(parse_config(json.loads(paths.config.read_text())), root, str(DATA), start, end)
    opts = BotOptions(mode="shadow", state_dir=state, fsync=False, rule_signal=kw.pop("rule_signal", True), **kw)
    bot = Bot(paths, feed, opts)
    bot.start()
    return bot


def test_shadow_run_equals_backtest_run_trade_for_trade(tmp_path: Path) -> None:
    root = _root(tmp_path)
    start, end = "2024-02-01", "2024-03-26"  # 5,184 real bars
    bot = _bot(root, tmp_path / "state", start, end)
    assert bot.run() == 5184
    res = parity_backtest(bot.dir, bot.feed.candles, bot.feed.start, bot.feed.end, bot.deployed)
    assert res.line() == f"parity: 0 mismatches over 5184 bars, {res.trades} trades" and res.trades >= 100

    # the same window through backtest/run.py itself (its trade CSV), trade for trade
    from cli.backtest import main as backtest_main

    csv = tmp_path / "trades.csv"
    assert backtest_main(["--root", str(root), "--data", str(DATA), "--from", start, "--to", end, "--rule-signal",
                          "--trades", str(csv)]) == 0
    ref = pd.read_csv(csv)
    mine = pd.DataFrame([x["closed"] for x in bar_lines(bot.journal) if x["closed"]])
    assert len(mine) == len(ref) == res.trades
    assert mine["entry_time"].tolist() == [pd.Timestamp(t).isoformat() for t in ref["entry_time"]]
    assert mine["exit_reason"].tolist() == ref["exit_reason"].tolist()
    assert mine["side"].tolist() == ref["side"].tolist()
    for col in ("size", "entry_price", "exit_price", "stop", "target", "pnl"):
        np.testing.assert_allclose(mine[col], ref[col], rtol=1e-9, err_msg=col)

    # the daily check replays one journaled day from its saved start state: exact too
    when = next(d for d in bot.journal.days()[1:] if any(x["order"] for x in bot.journal.read(d)))
    day = parity_day(bot.dir, when, Paths.of(root), bot.deployed, "shadow")
    assert day.bars == 96 and day.mismatches == 0, day.details
    # a journal edited after the fact is caught
    p = bot.journal.path(when)
    lines = p.read_text().splitlines()
    k = next(i for i, x in enumerate(lines) if json.loads(x)["order"])
    rec = json.loads(lines[k])
    rec["order"]["size"] += 0.01
    lines[k] = json.dumps(rec)
    p.write_text("\n".join(lines) + "\n")
    bad = parity_day(bot.dir, when, Paths.of(root), bot.deployed, "shadow")
    assert bad.mismatches == 1 and "order" in bad.details[0]


def _cli(root: Path, state: Path, start: str, end: str, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LIVE_CRASH_AT"}
    env["PYTHONPATH"] = str(REPO)
    if crash:
        env["LIVE_CRASH_AT"] = crash
    return subprocess.run([sys.executable, str(REPO / "scripts" / "live.py"), "--root", str(root), "--data", str(DATA),
                           "--from", start, "--to", end, "--rule-signal", "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=600, env=env)


def test_kill_at_several_bars_and_restart_gives_the_same_journal(tmp_path: Path) -> None:
    root = _root(tmp_path)
    start, end = "2024-05-01", "2024-05-04"
    ref = _bot(root, tmp_path / "ref", start, end)
    ref.run()
    lines = bar_lines(ref.journal)
    entry = next(x["bar"] for x in lines if x["order"])
    close = next(x["bar"] for x in lines if x["closed"] and x["bar"] > entry + 2)
    day_start = next(x["bar"] for x in lines if x["time"].startswith("2024-05-02"))
    state = tmp_path / "killed"
    for crash in (f"after_journal@{entry}", f"torn_journal@{close}", f"before_journal@{day_start}",
                  f"after_state@{day_start + 5}"):
        got = _cli(root, state, start, end, crash)
        assert got.returncode == -9, (crash, got.stdout[-500:], got.stderr[-2000:])
    final = _cli(root, state, start, end)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "parity: 0 mismatches over 288 bars" in final.stdout
    a, b = Journal(ref.dir, False), Journal(state, False)
    assert a.days() == b.days() == ["2024-05-01", "2024-05-02", "2024-05-03"]
    for d in a.days():
        assert a.path(d).read_bytes() == b.path(d).read_bytes(), d
    assert json.loads((state / "state.json").read_text())["trader"] == ref.trader.state.to_dict()
    # one instance per state folder: a second one exits 3 while the first holds the lock
    from ops.lock import run_lock

    with run_lock(Paths.of(root), lock_path=state / ".live.lock", holder="live bot instance"):
        second = _cli(root, state, start, end)
    assert second.returncode == 3 and "another live bot instance" in second.stderr


# ---------------------------------------------------------------------------------------------- weekly swap
def _tiny_set(folder: Path, seed: int) -> None:
    """Three tiny calibrated signal models on real features (labels: the sign of the next 8 bars' return)."""
    from market.features import build_features, feature_names
    from ml.models.manifest import save_model
    from ml.models.signal import calibrate_models, fit_signal_models

    cfg = default_config()
    candles = real_btc(7000)
    feats = build_features(candles, cfg).to_numpy()[1000:6000]
    fwd = np.log(candles["close"]).diff(8).shift(-8).to_numpy()[1000:6000]
    y = np.digitize(fwd, [-0.002, 0.002]).astype(np.int64)
    tiny = {"rf": {"n_estimators": 8, "max_depth": 4}, "xgb": {"n_estimators": 15, "max_depth": 2},
            "lgb": {"n_estimators": 15, "num_leaves": 4, "min_child_samples": 20}}
    X = np.nan_to_num(feats).astype(np.float32)
    models = calibrate_models(fit_signal_models(X[:3500], y[:3500], tiny, seed=seed), X[3500:], y[3500:])
    for k, m in models.items():
        save_model(folder, f"signal_{k}", m, feature_names=feature_names(cfg), train_range={"start": "a", "end": "b"},
                   data_hash="d" * 64, params=tiny[k], seed=seed, metrics={}, kind=f"signal_{k}")


@pytest.mark.slow
def test_weekly_swap_keeps_the_open_position_and_refuses_a_tampered_set(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from ml.models.manifest import FILES, KEY_ENV
    from ops import deploy

    monkeypatch.setenv(KEY_ENV, "k" * 40)  # this machine's signing key (the sets are signed with it)

    root = _root(tmp_path, {"risk_profile": "aggressive", "trading": {"confidence_threshold": 0.35}})
    paths = Paths.of(root)
    _tiny_set(tmp_path / "setA", seed=1)
    _tiny_set(tmp_path / "setB", seed=2)
    shutil.copytree(tmp_path / "setA", paths.models)
    bot = _bot(root, tmp_path / "state", "2024-07-01", "2024-07-08", rule_signal=False)
    old_id = bot.deployed.id
    bot.opts.max_bars = bot.processed + 1
    while not bot.trader.state.side:  # trade until a position is open
        bot.opts.max_bars = bot.processed + 1
        bot.run()
    held = bot.trader.state
    stop, target, entry_bar = held.stop, held.target, held.entry_bar

    staged = deploy.stage_dir(paths, "week2")
    shutil.copytree(tmp_path / "setB", staged, dirs_exist_ok=True)
    deploy.commit(paths, "week2", staged, paths.config.read_text())
    bot.opts.max_bars = bot.processed + 1
    bot.run()
    day = bot.last.time.strftime("%Y-%m-%d")
    swap = [x for x in bot.journal.read(day) if x.get("event") == "swap"]
    assert len(swap) == 1 and swap[0]["from"] == old_id and swap[0]["to"] == bot.deployed.id != old_id
    s = bot.trader.state
    if s.side:  # still open after the switch bar: same position, same stop and target
        assert (s.stop, s.target, s.entry_bar) == (stop, target, entry_bar)
        assert "kept" in swap[0]["position"] and "new exit model" in swap[0]["position"]
    else:  # it closed on the switch bar itself: the trade record carries the original levels
        closed = bot.journal.read(day)[-1]["closed"]
        assert (closed["stop"], closed["target"]) == (stop, target)

    # a new set whose model file no longer matches its manifest (tampered / corrupted on the way) is refused; the
    # set in use keeps trading
    new_id = bot.deployed.id
    staged = deploy.stage_dir(paths, "week3")
    shutil.copytree(tmp_path / "setA", staged, dirs_exist_ok=True)
    f = staged / FILES["signal_rf"]
    raw = f.read_bytes()
    f.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    deploy.commit(paths, "week3", staged, paths.config.read_text())
    bot.opts.max_bars = bot.processed + 3
    bot.run()
    lines = bot.journal.read(bot.last.time.strftime("%Y-%m-%d"))
    refused = [x for x in lines if x.get("event") == "set_refused"]
    assert len(refused) == 1 and "signal_rf" in refused[0]["reason"] and refused[0]["kept"] == new_id, refused
    assert [x["set"] for x in lines if x.get("type") == "bar"][-3:] == [new_id] * 3
    assert "refused" in (bot.dir / "notifications.md").read_text()


def test_weekly_report_shows_what_the_deployed_set_did_since_its_deploy(tmp_path: Path) -> None:
    from ops.bot.runner import ParityResult, since_last_deploy
    from ops.report import render_markdown

    root = _root(tmp_path)
    bot = _bot(root, root / "live" / "shadow", "2024-05-01", "2024-05-03")
    bot.run()
    bot.report_parity(ParityResult("2024-05-02", 96, 3, 1, ["bar 1: order 1/0.1 != 1/0.2"]))
    live = since_last_deploy(Paths.of(root))
    closed = [x["closed"] for x in bar_lines(bot.journal) if x["closed"]]
    assert live is not None and live["bots"][0]["bars"] == 192 and live["bots"][0]["trades"] == len(closed) > 0
    assert live["bots"][0]["net_profit"] == pytest.approx(sum(c["pnl"] for c in closed))
    text = render_markdown({"run_id": "r", "live": live})
    assert "## Since the last deploy" in text and "| shadow |" in text
    assert "parity mismatch (shadow) 2024-05-02: 1 mismatches" in text
