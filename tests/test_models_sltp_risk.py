"""The SL/TP and risk models: labels on hand-made trades, parity with the backtester, determinism, prerequisites,
and the whole chain signal -> position -> SL/TP -> risk on real BTC data through the retrain scripts.

No mocks of our own code: real candles, the real feature code, the real backtest engine and real LightGBM.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from backtest.engine import prepare_arrays, run_arrays
from backtest.policy import ACCOUNT_STATE_FEATURES, EXIT_MODEL, EXIT_TIME, make_params, replace_params
from backtest.rules import RuleSignal, toy_risk_model
from backtest.trees import predict_batch
from core.config import config_to_json, default_config, parse_config
from core.errors import UserError
from market.features import build_features
from ml.models.manifest import save_model
from ml.models.position import fit_position_model, position_rows
from ml.models.risk import RiskModel, account_states, fit_risk_model, risk_labels, train_risk
from ml.models.sltp import CLIP_MAX, CLIP_MIN, SltpModel, excursions, fit_sltp_model, sltp_rows, train_sltp
from tests._candles import real_btc

REPO = Path(__file__).resolve().parent.parent


def _cfg(**changes: dict) -> object:
    raw = default_config().model_dump(mode="json")
    for section, values in changes.items():
        raw[section].update(values)
    return parse_config(raw)


# ============================================================================================== SL/TP labels
def test_excursions_of_hand_made_bars() -> None:
    high = np.array([0, 0, 103, 101, 108, 104, 100.0])
    low = np.array([0, 0, 98, 95, 99, 90, 92.0])
    # long from 100 over bars 2..5: best high 108 at bar 4; adverse up to bar 4 = 100 - 95; over all = 100 - 90
    assert excursions(high, low, 1, 100.0, 2, 5, 10.0) == pytest.approx((0.5, 0.8, 1.0, 4))
    # short from 99 over bars 3..6: best low 90 at bar 5; adverse up to bar 5 = 108 - 99; over all the same
    assert excursions(high, low, -1, 99.0, 3, 6, 10.0) == pytest.approx((0.9, 0.9, 0.9, 5))
    # a trade that only goes against us: peak at the fill bar, the stop label is that bar's heat only
    assert excursions(np.array([100.0, 100.0]), np.array([97.0, 90.0]), 1, 100.0, 0, 1, 1.0) == \
        pytest.approx((3.0, 0.0, 10.0, 0))


def test_sltp_labels_equal_the_mae_mfe_of_hand_made_trades() -> None:
    cfg = _cfg(trading={"max_holding_bars": 4}, costs={"slippage_points": 0.0})
    #            0    1    2    3    4    5    6    7    8    9
    open_ = [100, 100, 100, 99, 100, 101, 95, 96, 96, 96]
    high = [101, 101, 103, 101, 108, 104, 100, 97, 97, 97]
    low = [99, 99, 98, 95, 99, 90, 92, 95, 95, 95]
    n = len(open_)
    idx = pd.date_range("2024-01-02 08:00", periods=n, freq="15min", tz="UTC", name="time")
    candles = pd.DataFrame({"open": open_, "high": high, "low": low, "close": open_, "tick_volume": 1.0,
                            "spread": 0.0, "real_volume": 1.0}, index=idx, dtype=float)
    feats = pd.DataFrame({"atr": np.full(n, 10.0, np.float32), "x": np.arange(n, dtype=np.float32)}, index=idx)
    ds = SimpleNamespace(candles=candles, features=feats, splits=SimpleNamespace(embargo=5))
    pls = np.full((n, 2), np.nan)
    pls[1] = [0.9, 0.1]  # long decided at bar 1 -> filled at open[2] = 100, held bars 2..5 (max holding 4)
    pls[2] = [0.1, 0.9]  # short decided at bar 2 -> filled at open[3] = 99, held bars 3..6 (overlap is fine)
    rows = sltp_rows(ds, pls, cfg, np.array([1, 2]), exit_model=None)
    np.testing.assert_array_equal(rows.bars, [1, 2])
    np.testing.assert_array_equal(rows.side, [1, -1])
    np.testing.assert_array_equal(rows.last_bar, [5, 6])
    np.testing.assert_allclose(rows.sl, [0.5, 0.9])  # (100 - 95) / 10 ; (108 - 99) / 10
    np.testing.assert_allclose(rows.tp, [0.8, 0.9])  # (108 - 100) / 10 ; (99 - 90) / 10
    np.testing.assert_allclose(rows.mae_total, [1.0, 0.9])
    np.testing.assert_array_equal(rows.X, feats.to_numpy()[[1, 2]])


@pytest.fixture(scope="module")
def btc() -> SimpleNamespace:
    cfg = default_config()
    candles = real_btc(6000)
    feats = build_features(candles, cfg)
    ds = SimpleNamespace(candles=candles, features=feats, splits=SimpleNamespace(embargo=cfg.splits.embargo_bars),
                         feature_names=list(feats.columns))
    rule = RuleSignal(list(feats.columns))
    pls = rule.signal_proba(feats.to_numpy(np.float32))
    rows = position_rows(ds, pls, cfg, np.arange(800, 5000))
    pos_model = fit_position_model(rows.X, rows.y, {"num_boost_round": 60}, seed=1)
    return SimpleNamespace(cfg=cfg, ds=ds, pls=pls, rule=rule, pos_model=pos_model)


def test_holding_period_ends_where_the_backtester_exits(btc: SimpleNamespace) -> None:
    """With stop/target out of reach, the backtester's trades end by the position model or max holding: exactly the
    labels' holding periods."""
    cfg = _cfg(trading={"fixed_sl_atr": 20.0, "fixed_tp_atr": 40.0, "exit_threshold": 0.55})
    ds, names = btc.ds, btc.ds.feature_names
    em = btc.pos_model.exit_model(names)
    arrays = prepare_arrays(ds.candles, ds.features, RuleSignal(names, exit_model=em), cfg)
    p = replace_params(make_params(cfg), daily_loss_limit_pct=100.0, max_consecutive_losses=10**9,
                       max_drawdown_halt_pct=100.0, cooldown_bars=0)
    t = run_arrays(arrays, p, 800, 5000).trades
    done = np.isin(t["reason"], [EXIT_MODEL, EXIT_TIME])
    assert done.sum() > 50 and np.any(t["reason"] == EXIT_MODEL)
    rows = sltp_rows(ds, btc.pls, cfg, t["entry"][done] - 1, exit_model=em)
    np.testing.assert_array_equal(rows.bars, t["entry"][done] - 1)
    np.testing.assert_array_equal(rows.last_bar, t["exit"][done] - 1)  # decided at that close, filled at the next open
    np.testing.assert_array_equal(rows.side, t["side"][done])


def test_sltp_model_is_bounded_deterministic_and_picklable(btc: SimpleNamespace) -> None:
    rows = sltp_rows(btc.ds, btc.pls, btc.cfg, np.arange(800, 5000), btc.pos_model.exit_model(btc.ds.feature_names))
    assert rows.n > 500
    cut = int(rows.n * 0.8)
    args = (rows.X[:cut], rows.sl[:cut], rows.tp[:cut], btc.ds.feature_names, {"num_boost_round": 60}, 5)
    ev = (rows.X[cut:], rows.sl[cut:], rows.tp[cut:])
    a = fit_sltp_model(*args, eval_set=ev)
    b = fit_sltp_model(*args, eval_set=ev)
    X = btc.ds.features.to_numpy(np.float32)[800:5000]
    pa = a.predict(X)
    np.testing.assert_array_equal(pa, b.predict(X))
    assert pa.shape == (X.shape[0], 2) and pa.min() >= CLIP_MIN and pa.max() <= CLIP_MAX
    np.testing.assert_array_equal(a.predict(X[:1]), pa[:1])  # row-wise: one row alone = the same row in a batch
    c = pickle.loads(pickle.dumps(a))
    assert isinstance(c, SltpModel)
    np.testing.assert_array_equal(c.predict(X), pa)


# ============================================================================================== risk labels
def test_risk_labelling_rule_on_a_hand_made_trade_list() -> None:
    r = np.array([1.0, -1.0, 2.0, -1.0, -1.0, 0.5])
    # forward means over 2 trades: [0, .5, .5, -1, -.25, .5] (the last one alone); mean 1/24, std 0.5480394...
    want = [0.9809928519682574, 1.209078628349169, 1.209078628349169, 0.524821299206434, 0.8669499637778015,
            1.209078628349169]
    np.testing.assert_allclose(risk_labels(r, 0.25, 1.5, window=2), want, rtol=1e-12)
    # the cap (R 10 counts as 3) and the band: z = [5/3, -1, -1/3, -1/3] -> 1 + z clipped to [0.25, 1.5]
    np.testing.assert_allclose(risk_labels(np.array([10.0, -1.0, 0.0, 0.0]), 0.25, 1.5, window=1, k=1.0),
                               [1.5, 0.25, 2 / 3, 2 / 3], rtol=1e-12)
    assert np.all(risk_labels(np.ones(7), 0.25, 1.5) == 1.0)  # no spread in outcomes: nothing to redistribute
    assert risk_labels(np.zeros(0), 0.25, 1.5).size == 0


def test_account_states_replay_equals_what_the_kernel_feeds_the_risk_model(btc: SimpleNamespace) -> None:
    cfg, ds = btc.cfg, btc.ds
    trees = toy_risk_model()
    arrays = prepare_arrays(ds.candles, ds.features, RuleSignal(ds.feature_names, risk_model=trees), cfg)
    p = make_params(cfg)
    run = run_arrays(arrays, p, 800, 6000)
    assert run.n_trades > 20
    X = account_states(run.trades, ds.candles.index, arrays.atr, p)
    assert X.shape == (run.n_trades, len(ACCOUNT_STATE_FEATURES))
    mult = np.clip(predict_batch(trees, X), p.risk_multiplier_min, p.risk_multiplier_max)
    np.testing.assert_array_equal(mult, run.trades["mult"])
    assert X[0].tolist()[:4] == [0.0, 0.5, 0.0, 0.0]  # first decision: no drawdown, no history


def test_risk_model_is_bounded_and_deterministic() -> None:
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.uniform(0, 20, 600), rng.uniform(0, 1, 600), rng.integers(0, 6, 600),
                         rng.normal(0, 0.05, 600), rng.uniform(0.5, 2, 600), rng.integers(1, 8, 600)])
    y = np.clip(1.0 + 2.0 * (X[:, 1] - 0.5) - 0.05 * X[:, 0], 0.25, 1.5)
    a = fit_risk_model(X[:450], y[:450], 0.25, 1.5, None, 3, eval_set=(X[450:], y[450:]))
    b = fit_risk_model(X[:450], y[:450], 0.25, 1.5, None, 3, eval_set=(X[450:], y[450:]))
    np.testing.assert_array_equal(a.multiplier(X), b.multiplier(X))
    wild = X * 50.0
    m = a.multiplier(wild)
    assert m.min() >= 0.25 and m.max() <= 1.5
    assert np.corrcoef(a.multiplier(X[450:]), y[450:])[0, 1] > 0.8  # learns the planted relation
    c = pickle.loads(pickle.dumps(a))
    assert isinstance(c, RiskModel)
    np.testing.assert_array_equal(c.multiplier(X), a.multiplier(X))
    np.testing.assert_allclose(predict_batch(a.compiled(), X), a.booster.predict(X), rtol=0, atol=1e-12)


# ============================================================================================== prerequisites
def _dummy_models(folder: Path, keys: list[str]) -> None:
    """Manifest entries + files for ``keys`` (the prerequisite check looks at files and hashes, never decodes)."""
    from sklearn.dummy import DummyClassifier

    placeholder = DummyClassifier().fit([[0.0], [1.0]], [0, 1])
    for k in keys:
        save_model(folder, k, placeholder, feature_names=["x"], train_range={}, data_hash="", params={},
                   seed=0, metrics={}, kind="test placeholder")


SIGNAL = ["signal_rf", "signal_xgb", "signal_lgb"]


def test_prerequisite_order_is_enforced(tmp_path: Path) -> None:
    ds = SimpleNamespace(feature_names=["x"])
    with pytest.raises(UserError, match=r"SL/TP model needs the signal models"):
        train_sltp(ds, default_config(), tmp_path)
    _dummy_models(tmp_path, SIGNAL)
    with pytest.raises(UserError, match=r"SL/TP model needs the position model: .*position\.zip missing; "
                                        r"run scripts/retrain_position\.py first"):
        train_sltp(ds, default_config(), tmp_path)
    with pytest.raises(UserError, match=r"risk model needs the position model"):
        train_risk(ds, default_config(), tmp_path)
    _dummy_models(tmp_path, ["position"])
    with pytest.raises(UserError, match=r"risk model needs the SL/TP model: .*sl_tp\.zip missing; "
                                        r"run scripts/retrain_sltp\.py first"):
        train_risk(ds, default_config(), tmp_path)


@pytest.mark.parametrize(("script", "have", "message"), [
    ("retrain_sltp.py", SIGNAL, "SL/TP model needs the position model"),
    ("retrain_risk.py", [*SIGNAL, "position"], "risk model needs the SL/TP model"),
])
def test_retrain_scripts_without_prerequisites_exit_2_with_one_line(tmp_path: Path, script: str, have: list[str],
                                                                    message: str) -> None:
    (tmp_path / "config.json").write_text(config_to_json(default_config()), encoding="utf-8")
    _dummy_models(tmp_path / "models", have)
    before = sorted(p.name for p in (tmp_path / "models").iterdir())
    res = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--root", str(tmp_path), "--demo"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == before


# ============================================================================================== the whole chain
@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A run root on 20,000 real bars (4-week OOS window) with freshly trained signal models deployed."""
    from market.dataset import build_dataset
    from ml.models.signal import train_signal

    root = tmp_path_factory.mktemp("chain")
    cfg = _cfg(splits={"oos_weeks": 4}, trading={"confidence_threshold": 0.4})
    (root / "config.json").write_text(config_to_json(cfg), encoding="utf-8")
    candles = real_btc(20_000)
    data = root / "btc_20k.csv"
    candles.reset_index().assign(time=lambda f: f["time"].dt.strftime("%Y-%m-%d %H:%M:%S")).to_csv(data, index=False)
    ds = build_dataset(candles, cfg)
    out = train_signal(ds, cfg, params={"rf": {"n_estimators": 30}})
    for m, model in out["models"].items():
        save_model(root / "models", f"signal_{m}", model, feature_names=ds.feature_names,
                   train_range=out["train_range"], data_hash=out["data_hash"], params={}, seed=out["seed"],
                   metrics={}, kind="signal")
    return SimpleNamespace(root=root, cfg=cfg, ds=ds, data=data)


def _script(name: str, chain: SimpleNamespace) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), "--root", str(chain.root), "--data",
                           str(chain.data)], capture_output=True, text=True, timeout=300)


def test_retrain_chain_position_sltp_risk_and_the_backtest_uses_them(chain: SimpleNamespace) -> None:
    from backtest.engine import run_fast
    from ml.models.bundle import load_bundle
    from ml.models.manifest import read_manifest

    for name, key in (("retrain_position.py", "position"), ("retrain_sltp.py", "sl_tp"), ("retrain_risk.py", "risk")):
        res = _script(name, chain)
        assert res.returncode == 0, res.stderr
        assert f"{key}: sha256 none -> " in res.stdout and f"{key}: new " in res.stdout, res.stdout
        assert "deployed retrain-" in res.stdout
    table = read_manifest(chain.root / "models")["models"]
    assert set(table) == {*SIGNAL, "position", "sl_tp", "risk"}
    assert table["risk"]["feature_names"] == ACCOUNT_STATE_FEATURES
    assert table["sl_tp"]["feature_names"] == chain.ds.feature_names
    assert table["position"]["feature_names"][:5] == ["side", "age_bars", "unrealised_atr", "dist_sl_atr",
                                                      "dist_tp_atr"]
    # the deployed set drives the backtester: model exits, SL/TP distances and risk multipliers all in play
    bundle = load_bundle(chain.root / "models", chain.ds.feature_names)
    assert bundle.exit_model is not None and bundle.risk_model is not None
    res = run_fast(chain.ds.candles, chain.ds.features, bundle, chain.cfg, start=int(chain.ds.splits.train[0]))
    tr = res.trades
    assert len(tr) > 50
    lo, hi = chain.cfg.trading.risk_multiplier_min, chain.cfg.trading.risk_multiplier_max
    assert tr["risk_mult"].between(lo, hi).all() and tr["risk_mult"].nunique() > 1
    sl_atr = (tr["entry_price"] - tr["stop"]).abs()
    assert sl_atr.nunique() > 10  # model distances, not one fixed multiple
    # retraining the position model again: same data, same seed -> identical file
    res = _script("retrain_position.py", chain)
    assert res.returncode == 0, res.stderr
    assert "(identical file)" in res.stdout and "note: sl_tp, risk were trained on top" in res.stdout
