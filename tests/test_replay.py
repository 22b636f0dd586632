"""The walk-forward replay (``scripts/replay.py``, ``ops/replay.py``) on a tiny DEMO workload, with real numbers.

* the cut: a source that ends at S keeps only bars closed by S; a replayed week on candles with planted future bars
  (which change the data the moment they are read) decides exactly as on the clean candles, and every week's
  candles, training range and evaluation windows end at or before its Sunday;
* state carried: the frozen policy's weeks, chained through the saved trading state, equal one continuous backtest
  of the same set over those weeks (same trades, equity to float tolerance);
* (the cut at the source and the counterfactual bookkeeping on a hand-made case: ``tests/test_replay_unit.py``);
* the demo: gated return >= never-retrain return (2 tiny weeks here, not 6 quick ones: CI time; the README has the
  6-week --quick replay);
* ``--workers 2`` and a Dask ``LocalCluster`` give the sequential replay's decisions and numbers.

Workload: ~94 days of demo candles, 2 OOS weeks, 2 + 2 trials, a 2-point sweep. Measured on the shared machine: about
1 minute of CPU per replayed week (7 weeks in this file: over the per-engineer test budget; marked slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _helpers import short_demo_raw

from core.config import config_to_json, parse_config
from core.paths import Paths
from ops import deploy
from ops.replay import Replay, ReplayOptions, Scorer, SetStore

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "replay.py"
START = "2025-12-07"  # Sundays 12-07, 12-14 (the demo ends 2026-01-01)
S1 = pd.Timestamp("2025-12-07 02:00", tz="UTC")
WEEKS = 2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # ~3 min on an idle 2-core machine, far more when shared


def tiny_config() -> str:
    raw = short_demo_raw(9_000, oos_weeks=2, confidence_threshold=0.35)  # enough trades for the risk labels (~3 months)
    raw["splits"]["n_folds"] = 2
    prof = raw["profiles"]["moderate"]
    prof["confidence_threshold"] = {"min": 0.35, "max": 0.4, "step": 0.05}  # a 2-point sweep
    prof["risk_percent"] = {"min": 1.0, "max": 1.0, "step": 0.5}
    prof["sl_multiplier"] = {"min": 1.0, "max": 1.0, "step": 0.2}
    prof["tp_multiplier"] = {"min": 1.0, "max": 1.0, "step": 0.2}
    prof["session_sets"] = [["asia", "london", "new_york"]]
    prof["min_trades"] = 1
    prof["max_drawdown_pct"] = 100.0
    prof["min_score"] = -1e9  # with --gate seed the first week always deploys a set: the policies trade something
    return config_to_json(parse_config(raw))


def _env() -> dict[str, str]:
    e = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(REPO)}
    for k in ("HF_TOKEN", "TELEGRAM_TOKEN", "TELEGRAM_CHAT_ID", "MT5_LOGIN", "WEEKLY_CRASH_AT"):
        e.pop(k, None)
    return e


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root: the tiny config, the demo candles as a file, the same file with planted future bars."""
    from market.data.demo import demo_candles

    root = tmp_path_factory.mktemp("replay") / "project"
    root.mkdir()
    (root / "config.json").write_text(tiny_config())
    cfg = parse_config(json.loads(tiny_config()))
    c = demo_candles(cfg)
    c.to_parquet(root / "demo.parquet")
    planted = c.copy()
    future = planted.index >= S1  # bars that close after the first Sunday
    for col in ("open", "high", "low", "close"):
        planted.loc[future, col] = planted.loc[future, col] * np.linspace(1.0, 1.6, int(future.sum()))
    planted.loc[future, "spread"] = 10.0
    planted.to_parquet(root / "planted.parquet")
    (root / "models").mkdir()
    (root / "models" / "keep.txt").write_text("the project's deployed state: a replay never touches it")
    return root


def _replay_cli(project: Path, rid: str, *args: str, data: str = "demo.parquet", weeks: int = WEEKS
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(project), "--data", str(project / data),
                           "--start", START, "--weeks", str(weeks), "--horizon-weeks", "1", "--gate", "seed",
                           "--id", rid, *args],
                          env=_env(), capture_output=True, text=True, timeout=2400)


@pytest.fixture(scope="module")
def sequential(project: Path) -> dict:
    before = deploy.hash_state(Paths.of(project))
    r = _replay_cli(project, "seq")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert sum(line.startswith("week ") for line in lines) == WEEKS  # one progress line per week
    last = lines[-1]
    keys = [kv.split("=")[0] for kv in last.split()]
    assert keys == ["weeks", "commits", "right", "gated_return_pct", "adopt_return_pct", "frozen_return_pct",
                    "replay_s"], last
    assert deploy.hash_state(Paths.of(project)) == before, "the replay touched the project's deployed state"
    out = json.loads((project / "results" / "replay-seq" / "replay.json").read_text())
    out["_last"] = last
    return out


# ------------------------------------------------------------------------------------------------ the cut
def test_a_week_on_planted_future_bars_decides_as_on_clean_ones(project: Path, sequential: dict) -> None:
    r = _replay_cli(project, "planted", data="planted.parquet", weeks=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    w = json.loads((project / "results" / "replay-planted" / "replay.json").read_text())["weeks"][0]
    ref = sequential["weeks"][0]
    for k in ("decision", "reason", "gate", "oos", "seen"):
        assert w[k] == ref[k], k
    assert w["counterfactual"]["challenger"]["next_week"] != ref["counterfactual"]["challenger"]["next_week"], \
        "the planted bars do change what is read after the Sunday (the scoring of the following week)"


def test_no_week_saw_a_bar_after_its_sunday(project: Path, sequential: dict) -> None:
    root = project / "results" / "replay-seq" / "root"
    for w in sequential["weeks"]:
        s = pd.Timestamp(w["sunday"])
        assert pd.Timestamp(w["seen"]["last_bar_close"]) == s
        run = root / "results" / w["run_id"]
        rep = json.loads((run / "report.json").read_text())
        splits = next(p for p in rep["phases"] if p["number"] == 3)["summary"]["splits"]
        for name in ("train", "fit", "calib", "oos", "sweep", "holdout"):
            assert pd.Timestamp(splits[name]["end"]) + pd.Timedelta(minutes=15) <= s, (w["week"], name)
        if w["challenger"] is None:
            continue
        man = project / "results" / "replay-seq" / "sets" / w["challenger"] / "models" / "manifest.json"
        for m in json.loads(man.read_text())["models"].values():
            tr = m["train_range"]
            assert pd.Timestamp(tr["end"]) <= s and pd.Timestamp(tr["oos_start"]) <= s


# ------------------------------------------------------------------------------------------------ state carried
def test_frozen_weeks_equal_one_continuous_backtest(project: Path, sequential: dict) -> None:
    d = project / "results" / "replay-seq"
    frozen = sequential["weeks"][0]["policies"]["frozen"]["sets"]
    assert frozen is not None and all(w["policies"]["frozen"]["sets"] == frozen for w in sequential["weeks"])
    from market.data.sources import read_file
    from market.features import build_features

    cfg = parse_config(json.loads(tiny_config()))
    candles = read_file(project / "demo.parquet", cfg)
    scorer = Scorer(candles, build_features(candles, cfg), SetStore(d / "sets"))
    end = S1 + WEEKS * pd.Timedelta(weeks=1)
    one = scorer.run(frozen, S1, end, close_at_end=True)
    curve = pd.concat([pd.read_parquet(d / "weeks" / f"{k:03d}.parquet")["frozen"] for k in range(1, WEEKS + 1)])
    np.testing.assert_allclose(curve.to_numpy(), one.equity.to_numpy(), rtol=1e-9)
    tr = pd.concat([pd.read_csv(d / "weeks" / f"{k:03d}.trades.csv") for k in range(1, WEEKS + 1)
                    if (d / "weeks" / f"{k:03d}.trades.csv").stat().st_size > 1])
    tr = tr[tr["policy"] == "frozen"].reset_index(drop=True)
    assert len(one.trades) > 0
    assert tr["entry_bar"].tolist() == one.trades["entry_bar"].tolist()
    assert tr["exit_bar"].tolist() == one.trades["exit_bar"].tolist()
    np.testing.assert_allclose(tr["pnl"].to_numpy(), one.trades["pnl"].to_numpy(), rtol=1e-9)
    print(f"frozen set over {WEEKS} weeks: {len(one.trades)} trades, final equity {one.equity.iloc[-1]:.2f}")
    # and three weeks through the replay's scoring path, state carried, == one continuous run of the same set
    st, eq, trades = None, [], []
    for k in range(3):
        a = S1 + k * pd.Timedelta(weeks=1)
        seg = scorer.run(frozen, a, a + pd.Timedelta(weeks=1), state=st, close_at_end=k == 2)
        st, eq, trades = seg.state, [*eq, seg.equity], [*trades, seg.trades]
    three = scorer.run(frozen, S1, S1 + pd.Timedelta(weeks=3), close_at_end=True)
    np.testing.assert_allclose(pd.concat(eq).to_numpy(), three.equity.to_numpy(), rtol=1e-9)
    tr3 = pd.concat(trades, ignore_index=True)
    assert tr3["entry_bar"].tolist() == three.trades["entry_bar"].tolist() and len(tr3) > 0
    np.testing.assert_allclose(tr3["pnl"].to_numpy(), three.trades["pnl"].to_numpy(), rtol=1e-9)


# ------------------------------------------------------------------------------------------------ the demo
def test_demo_gated_at_least_never_retrain(sequential: dict) -> None:
    tot = sequential["totals"]
    print(f"gated {tot['gated']['return_pct']:+.3f}%  never retrain {tot['frozen']['return_pct']:+.3f}%  "
          f"always adopt {tot['adopt']['return_pct']:+.3f}%  buy and hold {tot['hold']['return_pct']:+.3f}%  "
          f"| {sequential['_last']}")
    assert sequential["tally"]["weeks"] == WEEKS
    assert tot["gated"]["return_pct"] >= tot["frozen"]["return_pct"] - 1e-9


# ------------------------------------------------------------------------------------------------ parallel
def _decisions(result: dict, weeks: int) -> list[dict]:
    keys = ("sunday", "decision", "reason", "gate", "oos", "counterfactual", "judgement", "seen")
    return [{k: w[k] for k in keys} for w in result["weeks"][:weeks]]


def test_workers_equal_sequential(project: Path, sequential: dict) -> None:
    r = _replay_cli(project, "workers", "--workers", "2", weeks=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads((project / "results" / "replay-workers" / "replay.json").read_text())
    assert any(w["built"] == "built ahead" for w in got["weeks"]), [w["built"] for w in got["weeks"]]
    assert _decisions(got, 2) == _decisions(sequential, 2)


def test_dask_local_cluster_equals_sequential(project: Path, sequential: dict, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    from distributed import LocalCluster

    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    with LocalCluster(processes=True, n_workers=2, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        opts = ReplayOptions(start=START, weeks=2, data=str(project / "demo.parquet"), horizon_weeks=1, gate="seed")
        rep = Replay(Paths.of(project), "dask", opts, scheduler=cluster.scheduler_address, progress=print)
        got = rep.run()
    assert any(w["built"] == "built ahead" for w in got["weeks"]), [w["built"] for w in got["weeks"]]
    assert _decisions(got, 2) == _decisions(sequential, 2)


def test_resume_continues_after_the_last_finished_week(project: Path, sequential: dict) -> None:
    """A replay killed after its last finished week: --resume redoes only what is missing, same numbers."""
    import shutil

    src = project / "results" / "replay-seq"
    dst = project / "results" / "replay-resumed"
    shutil.copytree(src, dst)
    for f in (dst / "weeks").glob(f"{WEEKS:03d}.*"):
        f.unlink()
    (dst / "replay.json").unlink()
    lines: list[str] = []
    got = Replay(Paths.of(project), "resumed", ReplayOptions(start="1999-01-01", weeks=1), resume=True,
                 progress=lines.append).run()
    assert lines[0].startswith(f"resuming replay resumed after week {WEEKS - 1} of {WEEKS}"), lines
    assert got["weeks"][WEEKS - 1]["built"] == "finished before"  # the week's run had finished: only re-scored
    assert _decisions(got, WEEKS) == _decisions(sequential, WEEKS)
    assert got["totals"] == sequential["totals"]
