"""The position (exit) model: rows, targets, parity with the backtester, a planted edge, determinism, prerequisites.

Real numbers throughout: real BTC candles (``../shared/data``) through the real feature code, the real backtest
engine and real LightGBM; the rule-based momentum signal of ``backtest.rules`` (not a model) supplies the entry
probabilities where the saved signal ensemble is not the point of the test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from backtest.engine import prepare_arrays, run_arrays
from backtest.policy import EXIT_END, EXIT_MODEL, make_params, replace_params
from backtest.rules import RuleSignal
from core.config import config_to_json, default_config
from core.errors import UserError
from market.features import build_features
from ml.models.position import (
    DEFAULT_MARKET_FEATURES,
    PositionModel,
    fit_position_model,
    position_dataset,
    position_metrics,
    position_rows,
    train_position,
)
from tests._candles import real_btc

REPO = Path(__file__).resolve().parent.parent
START, STOP = 800, 5000  # decision bars of the simulated entries (after the features' warm-up)


@pytest.fixture(scope="module")
def btc() -> SimpleNamespace:
    """The first 6000 real BTC bars with their features, the rule signal's probabilities and the position rows."""
    cfg = default_config()
    candles = real_btc(6000)
    feats = build_features(candles, cfg)
    ds = SimpleNamespace(candles=candles, features=feats, splits=SimpleNamespace(embargo=cfg.splits.embargo_bars))
    rule = RuleSignal(list(feats.columns))
    pls = rule.signal_proba(feats.to_numpy(np.float32))
    rows = position_rows(ds, pls, cfg, np.arange(START, STOP))
    return SimpleNamespace(cfg=cfg, ds=ds, pls=pls, rule=rule, rows=rows)


def _no_breakers(cfg, **kw):  # noqa: ANN001, ANN202 - test helper
    """Params with the account breakers out of the way: the position rows ignore them by design."""
    return replace_params(make_params(cfg), daily_loss_limit_pct=100.0, max_consecutive_losses=10**9,
                          max_drawdown_halt_pct=100.0, cooldown_bars=0, **kw)


def _state_by_hand(side: int, fill: int, bar: int, entry: float, stop: float, target: float,
                   close: np.ndarray, atr: np.ndarray) -> list[float]:
    """POSITION_STATE_FEATURES written out from the policy's documented formulas (independent of its filler)."""
    a = atr[bar]
    return [side, bar - fill + 1, side * (close[bar] - entry) / a, side * (close[bar] - stop) / a,
            side * (target - close[bar]) / a]


def test_rows_come_from_open_positions_and_match_the_backtest(btc: SimpleNamespace) -> None:
    cfg, ds, rows = btc.cfg, btc.ds, btc.rows
    tr = rows.trades
    assert tr.n > 100 and rows.y.size > 500
    end = STOP - 1 + 1 + cfg.splits.embargo_bars
    arrays = prepare_arrays(ds.candles, ds.features, btc.rule, cfg)
    run = run_arrays(arrays, _no_breakers(cfg), START, end)
    eng = run.trades
    # the engine may go on trading after the last requested decision bar; compare the trades we both simulated
    mine = slice(0, tr.n)
    assert eng["entry"].size >= tr.n
    np.testing.assert_array_equal(eng["entry"][mine], tr.fill_bar)
    np.testing.assert_array_equal(eng["exit"][mine], tr.exit_bar)
    np.testing.assert_array_equal(eng["side"][mine], tr.side)
    np.testing.assert_array_equal(eng["entry_px"][mine], tr.entry)
    np.testing.assert_array_equal(eng["exit_px"][mine], tr.exit_price)
    np.testing.assert_array_equal(eng["stop"][mine], tr.stop)
    np.testing.assert_array_equal(eng["target"][mine], tr.target)
    assert not np.any(tr.reason == EXIT_END)

    close = ds.candles["close"].to_numpy(np.float64)
    open_ = ds.candles["open"].to_numpy(np.float64)
    atr = ds.features["atr"].to_numpy(np.float32).astype(np.float64)
    mf_cols = [list(ds.features.columns).index(c) for c in DEFAULT_MARKET_FEATURES]
    feats = ds.features.to_numpy(np.float32)
    cost = (0.5 * cfg.costs.default_spread_points + cfg.costs.slippage_points) * cfg.symbol_spec.point
    expected_bars = []
    for k in range(tr.n):
        f, x, s = int(tr.fill_bar[k]), int(tr.exit_bar[k]), int(tr.side[k])
        # a row for every close with the position open and below max holding: [fill, exit) minus the time-exit close
        bars = [b for b in range(f, x) if b - f + 1 < cfg.trading.max_holding_bars]
        expected_bars += bars
        sel = rows.groups == k
        np.testing.assert_array_equal(rows.bars[sel], bars)
        for i, b in zip(np.flatnonzero(sel), bars, strict=True):
            want = _state_by_hand(s, f, b, tr.entry[k], tr.stop[k], tr.target[k], close, atr)
            np.testing.assert_allclose(rows.X[i, :5], want, rtol=0, atol=1e-12)
            np.testing.assert_array_equal(rows.X[i, 5:], feats[b, mf_cols].astype(np.float64))
            exit_now = open_[b + 1] - s * cost  # the next open, exit costs paid (rule R11)
            assert rows.y[i] == int(s * (exit_now - tr.exit_price[k]) > 0)
    np.testing.assert_array_equal(rows.bars, expected_bars)
    X, y, groups = position_dataset(ds, btc.pls, cfg, np.arange(START, STOP))
    np.testing.assert_array_equal(X, rows.X)
    np.testing.assert_array_equal(y, rows.y)
    np.testing.assert_array_equal(groups, rows.groups)


def test_backtest_evaluates_the_trained_model_on_the_same_rows(btc: SimpleNamespace) -> None:
    """The kernel feeds the compiled booster the row layout we train on: its model exits happen exactly at the
    first close where LightGBM's own predict on our hand-built row reaches the threshold."""
    cfg, ds = btc.cfg, btc.ds
    model = fit_position_model(btc.rows.X, btc.rows.y, {"num_boost_round": 60}, seed=3)
    thr = 0.55
    names = list(ds.features.columns)
    pred = RuleSignal(names, exit_model=model.exit_model(names))
    arrays = prepare_arrays(ds.candles, ds.features, pred, cfg)
    run = run_arrays(arrays, _no_breakers(cfg, exit_threshold=thr), START, STOP)
    t = run.trades
    assert np.sum(t["reason"] == EXIT_MODEL) >= 5
    close = ds.candles["close"].to_numpy(np.float64)
    atr = ds.features["atr"].to_numpy(np.float32).astype(np.float64)
    mf = ds.features[DEFAULT_MARKET_FEATURES].to_numpy(np.float32).astype(np.float64)
    for k in range(min(t["entry"].size, 80)):
        f, x, s = int(t["entry"][k]), int(t["exit"][k]), int(t["side"][k])
        last = x - 1 if t["reason"][k] == EXIT_MODEL else x  # model exits fill at the open after the decision
        bars = [b for b in range(f, last + 1) if b - f + 1 < cfg.trading.max_holding_bars and b < x]
        if not bars:
            continue
        X = np.array([_state_by_hand(s, f, b, t["entry_px"][k], t["stop"][k], t["target"][k], close, atr) + list(mf[b])
                      for b in bars])
        p = model.predict_exit(X)
        if t["reason"][k] == EXIT_MODEL:
            assert p[-1] >= thr and np.all(p[:-1] < thr), k
        else:
            assert np.all(p < thr), k


def _planted_candles(n: int, seed: int, edge: bool) -> pd.DataFrame:
    """A random walk with tick-volume bursts on 3% of bars. With ``edge`` each burst is followed by a 0.6% drop
    (compensated by a small upward drift): for a long, exiting at the burst's close beats holding. Without it the
    bursts carry no information. The bursts do not move the price themselves, so the position state cannot tell."""
    rng = np.random.default_rng(seed)
    r = rng.normal(0.0, 0.002, n)
    vol = rng.uniform(80.0, 120.0, n)
    burst = rng.random(n) < 0.03
    vol[burst] *= 6.0
    if edge:
        nxt = np.flatnonzero(burst) + 1
        r[nxt[nxt < n]] -= 0.006
        r += 0.006 * 0.03
    close = 30_000.0 * np.exp(np.cumsum(r))
    open_ = np.concatenate([[close[0]], close[:-1]])
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.0005, n)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.0005, n)))
    idx = pd.date_range("2024-01-01", periods=n, freq="15min", tz="UTC", name="time")
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "tick_volume": vol,
                         "spread": 100.0, "real_volume": vol}, index=idx)


@pytest.mark.parametrize("edge", [True, False])
def test_planted_exit_edge_is_learned_and_noise_is_not(edge: bool) -> None:
    cfg = default_config()
    mf = [*DEFAULT_MARKET_FEATURES, "vol_z_96"]
    candles = _planted_candles(24_000, seed=1, edge=edge)
    ds = SimpleNamespace(candles=candles, features=build_features(candles, cfg), splits=SimpleNamespace(embargo=32))
    always_long = np.column_stack([np.full(len(candles), 0.9), np.full(len(candles), 0.05)])
    tr = position_rows(ds, always_long, cfg, np.arange(800, 16_000), mf)
    va = position_rows(ds, always_long, cfg, np.arange(16_100, 23_900), mf)  # held out, later in time
    model = fit_position_model(tr.X, tr.y, None, seed=0, market_features=mf)
    p = model.predict_exit(va.X)
    burst = va.X[:, model.feature_names.index("vol_z_96")] > 2.5
    assert burst.sum() > 100
    lift = p[burst].mean() - p[~burst].mean()
    if edge:
        assert va.y[burst].mean() > 0.8  # the planted edge is real in the held-out rows
        assert lift > 0.2
        assert np.mean((p[burst] >= cfg.trading.exit_threshold) == va.y[burst]) > 0.8
        m = position_metrics(va.y, p, cfg.trading.exit_threshold)
        assert m["auc"] > 0.6 and m["accuracy"] > m["majority_accuracy"]
    else:
        assert abs(lift) < 0.12


def test_same_seed_same_predictions_and_pickle_round_trip(btc: SimpleNamespace) -> None:
    import pickle

    X, y = btc.rows.X, btc.rows.y
    cut = int(len(y) * 0.8)
    ev = (X[cut:], y[cut:])
    a = fit_position_model(X[:cut], y[:cut], {"num_boost_round": 80}, seed=7, eval_set=ev)
    b = fit_position_model(X[:cut], y[:cut], {"num_boost_round": 80}, seed=7, eval_set=ev)
    np.testing.assert_array_equal(a.predict_exit(X), b.predict_exit(X))
    assert a.booster.model_to_string() == b.booster.model_to_string()
    c = pickle.loads(pickle.dumps(a))
    assert isinstance(c, PositionModel) and c.market_features == DEFAULT_MARKET_FEATURES
    np.testing.assert_array_equal(c.predict_exit(X), a.predict_exit(X))
    # the trimmed booster holds exactly the early-stopped trees: the compiled copy predicts the same
    from backtest.trees import predict_batch

    np.testing.assert_allclose(predict_batch(a.compiled(), X), a.predict_exit(X), rtol=0, atol=1e-12)
    assert a.info["rounds"] == a.booster.num_trees()


def test_position_metrics_on_a_hand_made_example() -> None:
    y = np.array([1, 1, 0, 0, 1, 0])
    p = np.array([0.9, 0.4, 0.7, 0.1, 0.8, 0.2])
    m = position_metrics(y, p, 0.6)
    # predicted exits: rows 0, 2, 4 -> two right; correct overall: 0, 3, 4, 5
    assert m["exit_precision"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["exit_recall"] == pytest.approx(2 / 3)
    assert m["objective"] == pytest.approx(4 / 6 * 2 / 3)
    assert position_metrics(y, np.zeros(6), 0.6)["exit_precision"] == 0.0  # never exiting is not "precise"


def test_train_position_requires_the_signal_models(tmp_path: Path) -> None:
    ds = SimpleNamespace(feature_names=[], splits=None)
    with pytest.raises(UserError, match=r"position model needs the signal models: .*signal_rf\.zip missing; "
                                        r"run scripts/retrain_signal\.py first"):
        train_position(ds, default_config(), tmp_path)


def test_retrain_position_script_without_signal_models_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(config_to_json(default_config()), encoding="utf-8")
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "retrain_position.py"), "--root", str(tmp_path),
                          "--demo"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "position model needs the signal models" in lines[0], res.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
