"""The replay's cheap parts on real numbers: the candle cut at the source, the Sundays, the gate-mode hook, and the
counterfactual bookkeeping on a hand-made 3-week case (the end-to-end replay is ``tests/test_replay.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.config import default_config, parse_config
from core.errors import UserError
from core.paths import Paths
from ops.replay import apply_gate_mode, judge, run_id_of, sundays, tally

S1 = pd.Timestamp("2025-12-07 02:00", tz="UTC")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Demo candles as a file, and the same file with planted future bars after S1."""
    from market.data.demo import demo_candles

    root = tmp_path_factory.mktemp("cut")
    raw = default_config().model_dump(mode="json")
    raw["data"]["demo_bars"] = 9_000
    c = demo_candles(parse_config(raw))
    c.to_parquet(root / "demo.parquet")
    planted = c.copy()
    future = planted.index >= S1
    for col in ("open", "high", "low", "close"):
        planted.loc[future, col] = planted.loc[future, col] * np.linspace(1.0, 1.6, int(future.sum()))
    planted.to_parquet(root / "planted.parquet")
    return root, root / "demo.parquet", root / "planted.parquet"


def test_source_cut_keeps_only_closed_bars(files: tuple[Path, Path, Path]) -> None:
    from market.data import closed_by, load_candles, refresh

    root, demo, planted = files
    cfg = default_config()
    paths = Paths.of(root)
    clean = load_candles(cfg, paths, demo, cutoff=S1)
    cut = load_candles(cfg, paths, planted, cutoff=S1)
    assert clean.index[-1] == S1 - pd.Timedelta(minutes=15)  # closes exactly at S: kept; the one opening at S: not
    pd.testing.assert_frame_equal(clean, cut)
    assert not load_candles(cfg, paths, planted).equals(load_candles(cfg, paths, demo))  # the planted bars differ
    # refresh (what phase 2 runs) returns the cut frame; naive cutoffs are UTC
    res = refresh(cfg, paths, planted, cutoff="2025-12-07 02:00")
    pd.testing.assert_frame_equal(res.frame, clean, check_freq=False)
    with pytest.raises(UserError, match="no bar closed"):
        closed_by(clean, "2000-01-01")


def test_sundays_and_run_ids() -> None:
    assert [str(s) for s in sundays("2024-09-01", 2)] == ["2024-09-01 02:00:00+00:00", "2024-09-08 02:00:00+00:00"]
    assert str(sundays("2024-09-02", 1)[0]) == "2024-09-08 02:00:00+00:00"  # a weekday moves to the next Sunday
    assert str(sundays("2024-09-01 03:00", 1)[0]) == "2024-09-08 02:00:00+00:00"  # after 02:00: next week
    assert run_id_of(S1) == "20251207T020000Z"


def test_gate_mode_hook() -> None:
    raw = json.loads(default_config().model_dump_json())
    for mode in ("seed", "default"):
        out, eff = apply_gate_mode(json.loads(json.dumps(raw)), mode)
        assert eff == mode and parse_config(out).pipeline.gate.mode == mode
    assert apply_gate_mode(raw, None)[1] == default_config().pipeline.gate.mode
    with pytest.raises(UserError, match="--gate"):
        apply_gate_mode(raw, "loose")


def test_counterfactual_bookkeeping_hand_made() -> None:
    good = {"score": 1.2, "net_profit": 300.0}
    bad = {"score": -0.8, "net_profit": -250.0}
    weeks = [
        {"decision": "commit", "champion": None, "judgement": judge("commit", None, good)},  # first set: apart
        {"decision": "commit", "champion": "a", "judgement": judge("commit", bad, good)},  # better, committed
        {"decision": "rollback", "champion": "b", "judgement": judge("rollback", good, bad)},  # worse, rolled back
    ]
    t = tally(weeks)
    assert t == {"weeks": 3, "commits": 2, "rollbacks": 1, "errors": 0, "judged": 2, "right": 2,
                 "right_by_score": 2, "right_by_profit": 2, "no_deployed_set": 1}
    # the wrong ones are counted wrong, each criterion on its own
    assert judge("commit", good, bad) == {"by_score": False, "by_profit": False, "right": False}
    assert judge("rollback", bad, good)["right"] is False
    mixed = judge("commit", {"score": 1.0, "net_profit": 100.0}, {"score": 1.1, "net_profit": 90.0})
    assert mixed == {"by_score": True, "by_profit": False, "right": False}
    assert judge("error", good, bad) is None
    assert tally([*weeks, {"decision": "error", "champion": "c", "judgement": None}])["errors"] == 1
