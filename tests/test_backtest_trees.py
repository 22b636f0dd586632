"""Compiled LightGBM trees equal ``booster.predict`` on real features, NaN inputs included."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest
from _candles import real_btc
from numba import njit

from backtest.trees import (
    OBJ_IDENTITY,
    OBJ_SIGMOID,
    build_trees,
    compile_booster,
    empty_trees,
    predict_batch,
    predict_raw_batch,
    predict_raw_exact,
)
from market.features import build_features


@pytest.fixture(scope="module")
def feats() -> np.ndarray:
    f = build_features(real_btc(6000))
    return f.to_numpy()  # float32, NaN in the warm-up rows


@njit
def exact(trees, X):  # noqa: ANN001, ANN201
    """Every row through the exact walker (LightGBM's full decision rule): the reference for the fast paths."""
    out = np.empty(X.shape[0])
    for i in range(X.shape[0]):
        out[i] = predict_raw_exact(trees, X[i])
    return out


def _train(X: np.ndarray, y: np.ndarray, objective: str, **extra: object) -> lgb.Booster:
    params = {"objective": objective, "num_leaves": 15, "learning_rate": 0.1, "min_data_in_leaf": 20, "verbose": -1,
              "seed": 3, "num_threads": 1, "deterministic": True, **extra}
    return lgb.train(params, lgb.Dataset(X, y), num_boost_round=40)


def test_binary_raw_and_proba_match_booster_including_nan(feats: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    X = feats.copy()
    X[rng.random(X.shape) < 0.05] = np.nan  # NaN everywhere, not only in the warm-up
    y = ((np.nan_to_num(X[:, 0]) + rng.normal(0, 0.002, len(X))) > 0).astype(float)
    booster = _train(X, y, "binary")
    ct = compile_booster(booster)
    assert ct.objective == OBJ_SIGMOID and ct.n_trees == 40
    raw = predict_raw_batch(ct, X.astype(np.float64))
    np.testing.assert_allclose(raw, booster.predict(X, raw_score=True), rtol=0, atol=1e-9)
    np.testing.assert_allclose(predict_batch(ct, X), booster.predict(X), rtol=0, atol=1e-9)


@pytest.mark.parametrize("extra", [{}, {"zero_as_missing": True}, {"use_missing": False}])
def test_regression_matches_booster_for_each_missing_mode(feats: np.ndarray, extra: dict[str, object]) -> None:
    rng = np.random.default_rng(2)
    X = feats.copy()
    X[rng.random(X.shape) < 0.05] = np.nan
    X[rng.random(X.shape) < 0.05] = 0.0  # exact zeros exercise missing_type "Zero"
    y = np.nan_to_num(X[:, 4]) * 0.01 + rng.normal(0, 1, len(X))
    booster = _train(X, y, "regression", **extra)
    ct = compile_booster(booster)
    assert ct.objective == OBJ_IDENTITY
    np.testing.assert_allclose(predict_raw_batch(ct, X.astype(np.float64)), booster.predict(X, raw_score=True),
                               rtol=0, atol=1e-9)


def test_random_forest_mode_and_sklearn_wrapper(feats: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    X = feats[1000:]
    y = rng.normal(0, 1, len(X)) + np.nan_to_num(X[:, 1]) * 50
    model = lgb.LGBMRegressor(boosting_type="rf", n_estimators=20, subsample=0.7, subsample_freq=1, num_leaves=8,
                              verbose=-1, random_state=4, n_jobs=1)
    model.fit(X, y)
    ct = compile_booster(model)
    np.testing.assert_allclose(predict_batch(ct, X), model.predict(X), rtol=0, atol=1e-9)


def test_empty_trees_predict_zero() -> None:
    ct = empty_trees(3)
    assert predict_raw_batch(ct, np.ones((4, 3))).tolist() == [0.0] * 4


def test_lookup_tables_equal_the_walker_at_and_around_every_threshold(feats: np.ndarray) -> None:
    """The binned tables (the fast path) reach the same leaf as the exact walker, bit for bit, also for inputs
    exactly on a threshold and one float step either side of it."""
    rng = np.random.default_rng(5)
    X = np.nan_to_num(feats[1000:3000, :8].astype(np.float64))
    y = X[:, 0] * 3 + rng.normal(0, 1, len(X))
    ct = compile_booster(_train(X, y, "regression"))
    assert ct.t_ok and ct.missing == 0
    split = ct.feature >= 0
    rows = []
    for f, thr in zip(ct.feature[split], ct.values[split], strict=True):
        for v in (thr, np.nextafter(thr, -np.inf), np.nextafter(thr, np.inf)):
            r = X[rng.integers(len(X))].copy()
            r[f] = v
            rows.append(r)
    Z = np.vstack([np.asarray(rows), X])
    np.testing.assert_array_equal(predict_raw_batch(ct, Z), exact(ct, Z))
    np.testing.assert_allclose(predict_raw_batch(ct, Z), lgb_predict(ct, Z, X, y), rtol=0, atol=1e-9)


def lgb_predict(ct, Z, X, y):  # noqa: ANN001, ANN201
    return _train(X, y, "regression").predict(Z, raw_score=True)


def test_bucket_index_is_exact_at_the_edges() -> None:
    """The bucket index that replaces the binary search counts the thresholds below a value exactly, also for
    infinite inputs, a single threshold, thresholds a float step apart, and a range too wide for its arithmetic
    (``max - min`` overflows: every threshold shares one bucket)."""
    def chain(f: int, thresholds: list[float]) -> dict[str, object]:
        """A tree splitting feature f at every threshold in turn, each leaf worth a different value."""
        node: dict[str, object] = {"leaf_value": float(len(thresholds))}
        for i, t in enumerate(sorted(thresholds, reverse=True)):
            node = {"split_feature": f, "threshold": t, "left_child": {"leaf_value": float(i) + 0.5 ** i},
                    "right_child": node}
        return node

    one = [2.5]
    tight = [1.0, float(np.nextafter(1.0, 2.0)), float(np.nextafter(np.nextafter(1.0, 2.0), 2.0)), 7.0]
    wide = [-1e308, -1.0, 0.0, 3e-310, 1e308]
    ct = build_trees([chain(0, one), chain(1, tight), chain(2, wide), chain(1, [0.5, 1.0, 9.0])], num_features=3)
    assert ct.t_ok
    probes = sorted({v for t in one + tight + wide + [0.5, 9.0]
                     for v in (t, float(np.nextafter(t, -np.inf)), float(np.nextafter(t, np.inf)))}
                    | {-np.inf, np.inf, 0.0, -0.0, 5e-324, 1.5, 1e300})
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.choice(probes, 3000) for _ in range(3)])
    got = predict_raw_batch(ct, X)
    np.testing.assert_array_equal(got, exact(ct, X))
    assert np.unique(got).size > 20  # the probes reach many different leaves
