"""The signal ensemble on data with a known answer: a planted edge is found, pure noise is not, calibration repairs
overconfident models, and the same seed gives bit-identical predictions.

The planted edge (documented here because the thresholds below depend on it): a hidden regime ``s`` in
{-1 short, 0 flat, +1 long} persists for 64 bars on average (a fresh uniform draw with probability 1/64 per bar).
Each bar's log return is ``0.25 * sigma * s + sigma * N(0, 1)`` with ``sigma = 0.2 %``, and the bar's tick volume is
``1000 * exp(0.6 * s + 0.3 * N(0, 1))``. So the next 16 bars' drift (the label horizon) depends on the regime, which
the *lagged, observable* volume features (``vol_rel_96``, ``vol_z_96``) and past returns reveal. The noise case is
the same generator with ``s = 0`` everywhere (a random walk with uninformative volume).

"Chance" on a held-out slice is the accuracy a predictor with the same prediction frequencies would get if it were
independent of the labels: ``sum_k P(pred = k) * P(y = k)``. Measured over seeds 0-5 (14,000 bars, OOS 6 weeks,
~4,000 held-out bars): planted edge +0.09 .. +0.17 above chance, noise -0.03 .. +0.014. Labels overlap (16-bar
horizon), so the effective sample is much smaller than the bar count; the margins below leave room for that.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.config import Config, default_config, parse_config
from market.dataset import Dataset, build_dataset
from ml.models.signal import (
    SIGNAL_MODELS,
    SignalModelError,
    calibrate_models,
    default_params,
    ensemble_proba,
    fit_signal_models,
    make_model,
    p_long_short,
    raw_and_calibrated_proba,
    rounds_used,
    signal_metrics,
    train_signal,
)

N_BARS = 14_000
# small, fast models: the test is about the pipeline (splits, early stopping, calibration), not about capacity
SMALL = {
    "rf": {"n_estimators": 40, "max_depth": 6, "min_samples_leaf": 20, "max_samples": 0.5},
    "xgb": {"n_estimators": 150, "learning_rate": 0.1, "max_depth": 3},
    "lgb": {"n_estimators": 150, "learning_rate": 0.1, "num_leaves": 7, "min_child_samples": 20},
}


def planted_candles(n: int, seed: int, edge: bool = True, mu: float = 0.25, persist: int = 64) -> pd.DataFrame:
    """Standard candle frame with the planted regime edge described in the module docstring (or pure noise)."""
    rng = np.random.default_rng(seed)
    sigma = 0.002
    if edge:
        switch = rng.random(n) < 1.0 / persist
        switch[0] = True
        draws = rng.integers(-1, 2, n)
        last = np.maximum.accumulate(np.where(switch, np.arange(n), 0))
        state = draws[last].astype(np.float64)
    else:
        state = np.zeros(n)
    r = mu * sigma * state + sigma * rng.standard_normal(n)
    close = 30_000.0 * np.exp(np.cumsum(r))
    open_ = np.concatenate([[30_000.0], close[:-1]])
    wick = np.abs(rng.standard_normal((2, n))) * sigma * 0.5
    high = np.maximum(open_, close) * np.exp(wick[0])
    low = np.minimum(open_, close) * np.exp(-wick[1])
    vol = 1000.0 * np.exp(0.6 * state + 0.3 * rng.standard_normal(n))
    idx = pd.date_range("2024-01-01", periods=n, freq="15min", tz="UTC", name="time")
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "tick_volume": vol,
                         "spread": 1500.0, "real_volume": vol}, index=idx)


def _cfg() -> Config:
    raw = default_config().model_dump(mode="json")
    raw["splits"]["oos_weeks"] = 6
    return parse_config(raw)


def _held_out(ds: Dataset) -> np.ndarray:
    """The final OOS window's bars with a fully observed label: never seen by fit, early stopping or calibration."""
    oos = ds.splits.oos
    return oos[ds.labels["valid"].to_numpy()[oos]]


def _chance(y: np.ndarray, pred: np.ndarray) -> float:
    return float(sum((pred == k).mean() * (y == k).mean() for k in range(3)))


@pytest.fixture(scope="module")
def edge_ds() -> Dataset:
    return build_dataset(planted_candles(N_BARS, seed=0, edge=True), _cfg())


@pytest.fixture(scope="module")
def edge_run(edge_ds: Dataset) -> dict:
    return train_signal(edge_ds, _cfg(), SMALL, n_jobs=1)


def test_planted_edge_beats_chance_on_held_out(edge_ds: Dataset, edge_run: dict) -> None:
    idx = _held_out(edge_ds)
    assert idx.size > 3000 and idx.min() > edge_ds.splits.calib.max()
    y = edge_ds.y[idx]
    proba = ensemble_proba(edge_run["models"], edge_ds.X[idx])
    pred = proba.argmax(axis=1)
    acc, chance = float((pred == y).mean()), _chance(y, pred)
    m = signal_metrics(y, proba)
    assert acc >= chance + 0.05, (acc, chance)
    assert m["f1_macro"] > 0.33, m
    # the returned validation metrics are out of sample for the trees and agree that there is an edge
    assert edge_run["metrics"]["val"]["ensemble"]["accuracy"] > 0.40
    assert edge_run["metrics"]["calibration_method"] == "isotonic"  # 1,376 calibration samples >= 1000
    # early stopping picked the boosters' rounds on the last fold, the refit scaled them by the data ratio
    for k in ("xgb", "lgb"):
        assert 1 <= edge_run["params"][k]["n_estimators"] <= int(np.ceil(150 * 1.5))


def test_pure_noise_does_not_beat_chance() -> None:
    """No-leakage check: with nothing to learn, held-out accuracy stays at chance. Leakage (a feature or split that
    sees the future) could only push it up, so the upper bound is the sharp one."""
    cfg = _cfg()
    ds = build_dataset(planted_candles(N_BARS, seed=0, edge=False), cfg)
    run = train_signal(ds, cfg, SMALL, n_jobs=1)
    idx = _held_out(ds)
    y = ds.y[idx]
    pred = ensemble_proba(run["models"], ds.X[idx]).argmax(axis=1)
    acc, chance = float((pred == y).mean()), _chance(y, pred)
    assert acc - chance < 0.03, (acc, chance)
    assert acc - chance > -0.05, (acc, chance)


def test_calibration_lowers_brier_and_ece_on_held_out(edge_ds: Dataset) -> None:
    """Overconfident models (deep boosters, many rounds, no early stopping) are repaired by calibrate_models on the
    later calibration slice; measured on the held-out OOS window that neither step saw."""
    sp = edge_ds.splits
    overfit = {
        "rf": {"n_estimators": 20, "min_samples_leaf": 1, "max_features": 0.5},
        "xgb": {"n_estimators": 80, "learning_rate": 0.3, "max_depth": 5},
        "lgb": {"n_estimators": 80, "learning_rate": 0.3, "num_leaves": 31, "min_child_samples": 5},
    }
    raw = fit_signal_models(edge_ds.X[sp.fit], edge_ds.y[sp.fit], overfit, seed=7, n_jobs=1)
    cal = calibrate_models(raw, edge_ds.X[sp.calib], edge_ds.y[sp.calib])
    idx = _held_out(edge_ds)
    X, y = edge_ds.X[idx], edge_ds.y[idx]
    before = signal_metrics(y, ensemble_proba(raw, X))
    after = signal_metrics(y, ensemble_proba(cal, X))
    assert after["brier"] < before["brier"] - 0.02, (before, after)
    assert after["ece"] < before["ece"] / 2, (before, after)
    for k in ("xgb", "lgb"):
        assert signal_metrics(y, cal[k].predict_proba(X))["brier"] < signal_metrics(y, raw[k].predict_proba(X))["brier"]


def test_same_seed_same_predictions_bitwise(edge_ds: Dataset, edge_run: dict) -> None:
    """Same data + seed -> identical calibrated predictions, bit for bit; the forest may fit on 2 threads (its
    trees' seeds are drawn up front) and still predicts identically."""
    again = train_signal(edge_ds, _cfg(), SMALL, n_jobs=None)  # forest on all cores, boosters on one thread
    X = edge_ds.X[_held_out(edge_ds)]
    a = ensemble_proba(edge_run["models"], X)
    b = ensemble_proba(again["models"], X)
    assert np.array_equal(a, b)
    for k in SIGNAL_MODELS:
        assert np.array_equal(edge_run["models"][k].predict_proba(X), again["models"][k].predict_proba(X)), k
    assert edge_run["data_hash"] == again["data_hash"]
    # and the seed matters: a different one gives a different forest
    other = fit_signal_models(edge_ds.X[edge_ds.splits.fit], edge_ds.y[edge_ds.splits.fit], {"rf": SMALL["rf"]},
                              seed=edge_run["seed"] + 1)
    assert not np.array_equal(other["rf"].predict_proba(X), edge_run["raw"]["rf"].predict_proba(X))


def test_early_stopping_and_model_settings(edge_ds: Dataset) -> None:
    sp = edge_ds.splits
    tr, va = sp.folds[-1]
    params = {k: {**SMALL[k], "n_estimators": 400, "learning_rate": 0.3} for k in ("xgb", "lgb")}
    models = fit_signal_models(edge_ds.X[tr], edge_ds.y[tr], params, seed=1, eval_set=(edge_ds.X[va], edge_ds.y[va]))
    for k, m in models.items():
        assert rounds_used(m) is not None and rounds_used(m) < 400, k  # stopped early on the validation block
    xgb = make_model("xgb", {"tree_method": "exact"}, seed=3)
    assert xgb.get_params()["tree_method"] == "hist"  # a parameter set cannot switch histograms off
    lgb = make_model("lgb", {"deterministic": False}, seed=3, n_jobs=2)
    assert lgb.get_params()["deterministic"] is True and lgb.get_params()["force_row_wise"] is True
    assert set(default_params()) == set(SIGNAL_MODELS)
    with pytest.raises(ValueError, match="unknown signal model"):
        make_model("svm", {}, seed=1)


def test_ensemble_helpers_and_metrics(edge_run: dict, edge_ds: Dataset) -> None:
    X = edge_ds.X[_held_out(edge_ds)][:200]
    models = edge_run["models"]
    p = ensemble_proba(models, X)
    assert p.shape == (200, 3) and np.allclose(p.sum(axis=1), 1.0)
    only_rf = ensemble_proba(models, X, weights={"rf": 1.0, "xgb": 0.0, "lgb": 0.0})
    assert np.array_equal(only_rf, models["rf"].predict_proba(X))
    ls = p_long_short(p)
    assert ls.shape == (200, 2) and np.array_equal(ls[:, 0], p[:, 2]) and np.array_equal(ls[:, 1], p[:, 0])
    with pytest.raises(ValueError):
        ensemble_proba(models, X, weights=[1.0, -1.0, 1.0])

    y = np.array([0, 1, 2, 2])
    perfect = signal_metrics(y, np.eye(3)[y])
    assert perfect["f1_macro"] == 1.0 and perfect["accuracy"] == 1.0 and perfect["brier"] == 0.0
    assert perfect["ece"] == 0.0 and perfect["log_loss"] < 1e-6
    flat = signal_metrics(y, np.full((4, 3), 1 / 3))
    assert abs(flat["brier"] - 2 / 3) < 1e-12 and abs(flat["log_loss"] - np.log(3)) < 1e-12


def test_calibration_method_follows_slice_size_and_missing_class_is_refused(edge_ds: Dataset,
                                                                              edge_run: dict) -> None:
    sp = edge_ds.splits
    raw = {"xgb": edge_run["raw"]["xgb"]}
    small = calibrate_models(raw, edge_ds.X[sp.calib][:600], edge_ds.y[sp.calib][:600])
    assert small["xgb"].method == "sigmoid"
    assert edge_run["models"]["xgb"].method == "isotonic"
    y = edge_ds.y[sp.fit].copy()
    y[y == 0] = 1  # no short labels at all
    with pytest.raises(SignalModelError, match="only the classes"):
        fit_signal_models(edge_ds.X[sp.fit], y, {"lgb": SMALL["lgb"]}, seed=1)


def test_one_pass_calibration_equals_sklearns_default_bit_for_bit(edge_ds: Dataset, edge_run: dict) -> None:
    """calibrate_models predicts the slice once instead of in sklearn's 5 chunks: the fitted calibrators (and so
    every probability) must be exactly those of ``CalibratedClassifierCV(FrozenEstimator(m))`` with its default cv."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    sp = edge_ds.splits
    X_eval = np.ascontiguousarray(edge_ds.X[sp.oos_start:sp.oos_start + 2000], dtype=np.float32)
    for n in (600, len(sp.calib)):  # sigmoid and isotonic
        Xc = np.ascontiguousarray(edge_ds.X[sp.calib][:n], dtype=np.float32)
        yc = edge_ds.y[sp.calib][:n]
        ours = calibrate_models(edge_run["raw"], Xc, yc)
        for name, model in edge_run["raw"].items():
            ref = CalibratedClassifierCV(FrozenEstimator(model), method=ours[name].method).fit(Xc, yc)
            assert np.array_equal(ours[name].predict_proba(X_eval), ref.predict_proba(X_eval)), (name, n)
            assert ours[name].get_params()["cv"] is None


def test_raw_and_calibrated_proba_walks_once_with_the_same_bits(edge_ds: Dataset, edge_run: dict) -> None:
    """The tuning folds get a model's raw and calibrated probabilities from one walk of its trees: both must be
    exactly what ensemble_proba computes for the model and for its calibrated wrapper, with the sigmoid and the
    isotonic calibrators, and the calibrated wrapper must predict as before afterwards (the served predictions are
    only lent to it)."""
    sp = edge_ds.splits
    X_eval = edge_ds.X[sp.oos_start:sp.oos_start + 2000]
    for n in (600, len(sp.calib)):  # sigmoid and isotonic
        cal = calibrate_models(edge_run["raw"], edge_ds.X[sp.calib][:n], edge_ds.y[sp.calib][:n])
        for name, model in edge_run["raw"].items():
            raw, calibrated = raw_and_calibrated_proba(model, cal[name], X_eval)
            assert np.array_equal(raw, ensemble_proba({name: model}, X_eval)), (name, n)
            want = ensemble_proba({name: cal[name]}, X_eval)
            assert np.array_equal(calibrated, want), (name, n)
            assert not np.array_equal(raw, calibrated)
            assert np.array_equal(ensemble_proba({name: cal[name]}, X_eval[:500]), want[:500])
        other = edge_run["raw"]["xgb"]  # a calibrator of another model is not fed this model's predictions
        assert np.array_equal(raw_and_calibrated_proba(other, cal["rf"], X_eval)[1],
                              ensemble_proba({"rf": cal["rf"]}, X_eval))
