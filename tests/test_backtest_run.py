"""``backtest/run.py``: OOS / in-sample labelling, outputs, and one-line exit 2 with nothing written on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from _candles import REAL_BTC, REPO, real_btc

from backtest.engine import run_fast, run_step
from backtest.rules import RuleSignal
from cli.backtest import LABEL_IN_SAMPLE, LABEL_OOS, main
from core.config import config_to_json, default_config
from core.errors import UserError, cli_main
from market.features import feature_names

N_ROWS = 20_000  # enough for the 12-week OOS window (8,064 bars) plus the feature warm-up


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("root")
    (r / "config.json").write_text(config_to_json(default_config()))
    (r / "models").mkdir()
    pd.read_csv(REAL_BTC).tail(N_ROWS).to_csv(r / "btc.csv", index=False)
    return r


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        cli_main(lambda: main(argv))
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def _outputs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_oos_only_rule_signal_writes_json_trades_plot_as_a_script(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, str(REPO / "backtest" / "run.py"), "--root", str(root), "--oos-only", "--rule-signal",
         "--data", str(root / "btc.csv"), "--json", str(out / "m.json"), "--trades", str(out / "t.csv"),
         "--plot", str(out / "eq.png")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "m.json").read_text())
    assert doc["label"] == LABEL_OOS and doc["in_sample"] is False
    assert "not a model" in doc["predictor"]
    assert doc["window"]["bars"] == 12 * 7 * 96
    assert doc["score"] == doc["metrics"]["score"]
    for key in ("net_profit", "return_pct", "max_drawdown_pct", "sharpe", "sortino", "profit_factor", "win_rate",
                "trades", "avg_r", "exposure_pct", "longest_losing_streak", "breaker_trips"):
        assert key in doc["metrics"]
    trades = pd.read_csv(out / "t.csv")
    assert len(trades) == doc["metrics"]["trades"]
    assert (out / "eq.png").stat().st_size > 10_000
    assert "score" in r.stdout and LABEL_OOS in r.stdout


def test_without_models_one_line_exit_2(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, err = cli(["--root", str(root), "--oos-only", "--data", str(root / "btc.csv"),
                        "--json", str(out / "m.json")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "no trained models" in err and "--rule-signal" in err
    assert _outputs(out) == []


def test_lookback_window_is_marked_possibly_in_sample(root: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["--root", str(root), "--rule-signal", "--data", str(root / "btc.csv"),
                        "--lookback-weeks", "20", "--json", str(tmp_path / "m.json")], capsys)
    assert code == 0 and LABEL_IN_SAMPLE in out and "WARNING" in out
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["label"] == LABEL_IN_SAMPLE and doc["in_sample"] is True


@pytest.mark.parametrize("bad", [
    ["--from", "2031-01-01"],  # empty window
    ["--from", "2024-12-01", "--to", "2024-12-01"],  # empty window
    ["--oos-only", "--from", "2024-11-01"],  # contradictory
    ["--from", "not-a-date"],
])
def test_bad_window_exit_2_nothing_written(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           bad: list[str]) -> None:
    out = tmp_path / "out"
    code, _, err = cli(["--root", str(root), "--rule-signal", "--data", str(root / "btc.csv"),
                        "--json", str(out / "m.json"), "--plot", str(out / "p.png"), *bad], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert _outputs(out) == []


def test_config_out_of_profile_bounds_exit_2(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = json.loads(config_to_json(default_config()))
    raw["trading"]["risk_percent"] = 5.0  # outside the moderate profile's [0.5, 1.5]
    cfg_path = tmp_path / "bad.json"
    cfg_path.write_text(json.dumps(raw))
    out = tmp_path / "out"
    code, _, err = cli(["--root", str(root), "--config", str(cfg_path), "--rule-signal", "--oos-only",
                        "--data", str(root / "btc.csv"), "--json", str(out / "m.json")], capsys)
    assert code == 2 and "risk_percent" in err and err.count("\n") == 1
    assert _outputs(out) == []


def test_gap_inside_window_exit_2(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.read_csv(root / "btc.csv")
    df = df.drop(df.index[-2000:-1988])  # a 3-hour hole inside the OOS window (limit: data.max_gap_minutes = 120)
    gap_csv = tmp_path / "gap.csv"
    df.to_csv(gap_csv, index=False)
    out = tmp_path / "out"
    code, _, err = cli(["--root", str(root), "--rule-signal", "--oos-only", "--data", str(gap_csv),
                        "--json", str(out / "m.json")], capsys)
    assert code == 2 and "gap" in err.lower() and err.count("\n") == 1
    assert _outputs(out) == []


def test_engine_refuses_gap_inside_window_and_allows_it_outside() -> None:
    cfg = default_config()
    candles = real_btc(3000)
    candles = candles.drop(candles.index[2000:2012])
    pred = RuleSignal(feature_names(cfg))
    with pytest.raises(UserError, match="gap"):
        run_fast(candles, None, pred, cfg, 1000, 2900)
    with pytest.raises(UserError, match="gap"):
        run_step(candles, pred, cfg, 1000, 2900)
    assert run_fast(candles, None, pred, cfg, 2100, 2900).equity.size == 800
    with pytest.raises(UserError, match="empty"):
        run_fast(candles, None, pred, cfg, 2900, 2900)


def test_step_flag_matches_fast(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--root", str(root), "--rule-signal", "--data", str(root / "btc.csv"), "--from", "2024-12-20",
            "--to", "2024-12-22"]
    code, _, _ = cli([*args, "--json", str(tmp_path / "fast.json")], capsys)
    assert code == 0
    code, _, _ = cli([*args, "--step", "--json", str(tmp_path / "step.json")], capsys)
    assert code == 0
    fast = json.loads((tmp_path / "fast.json").read_text())
    step = json.loads((tmp_path / "step.json").read_text())
    assert step["mode"] == "step" and fast["mode"] == "fast" and step["window"] == fast["window"]
    assert step["metrics"] == pytest.approx(fast["metrics"], rel=1e-9)
