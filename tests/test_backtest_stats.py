"""The gate's statistics against reference values (../shared/notes/statistics.md) and brute force, edge cases
included: zero variance, one day, NaN days, a window too short for CSCV. A number that cannot be computed must say
why (``ok = False`` + a reason), never crash and never look like a pass."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
from scipy import stats as sps

from backtest import stats as st


# ------------------------------------------------------------------------------------------- Sharpe family
def test_psr_and_expected_max_match_the_note() -> None:
    assert st.probabilistic_sharpe(0.1, 250, 0.0, 3.0, 0.0) == pytest.approx(0.94226, abs=5e-5)
    for n, ref in ((10, 1.5746), (100, 2.5306), (1000, 3.2551)):
        assert st.expected_max_sharpe(n, 1.0) == pytest.approx(ref, abs=5e-4)
    sr0 = st.expected_max_sharpe(100, 0.5 / 250)
    assert sr0 == pytest.approx(0.11317, abs=5e-5)
    assert st.probabilistic_sharpe(2.5 / math.sqrt(250), 1250, -3.0, 10.0, sr0) == pytest.approx(0.9004, abs=5e-4)
    assert st.expected_max_sharpe(1, 1.0) == 0.0  # one trial: no luck to deflate


def test_deflated_sharpe_uses_the_returns_moments() -> None:
    rng = np.random.default_rng(3)
    r = rng.standard_t(4, 300) * 0.01 + 0.002
    d = st.deflated_sharpe(r, 50, 0.004)
    assert d["ok"] and d["n_days"] == 300
    sr = r.mean() / r.std(ddof=1)
    g3, g4 = sps.skew(r), sps.kurtosis(r, fisher=False)
    assert d["sharpe"] == pytest.approx(sr) and d["skew"] == pytest.approx(g3) and d["kurtosis"] == pytest.approx(g4)
    sr0 = st.expected_max_sharpe(50, 0.004)
    z = (sr - sr0) * math.sqrt(299) / math.sqrt(1 - g3 * sr + (g4 - 1) / 4 * sr * sr)
    assert d["dsr"] == pytest.approx(sps.norm.cdf(z))
    # more trials (same spread) can only lower it
    assert st.deflated_sharpe(r, 5000, 0.004)["dsr"] < d["dsr"]


def test_deflated_sharpe_edge_cases_say_why() -> None:
    zero = st.deflated_sharpe(np.zeros(60), 100, 0.01)
    assert not zero["ok"] and "no variation" in zero["reason"] and zero["dsr"] is None
    one = st.deflated_sharpe(np.array([0.01]), 100, 0.01)
    assert not one["ok"] and "not enough days" in one["reason"]
    short = st.deflated_sharpe(np.random.default_rng(0).normal(0.01, 0.01, 19), 100, 0.01)
    assert not short["ok"] and "19 days" in short["reason"]
    r = np.random.default_rng(1).normal(0.001, 0.01, 40)
    r[[3, 7]] = np.nan
    nan = st.deflated_sharpe(r, 100, 0.01)
    assert nan["ok"] and nan["n_days"] == 38 and nan["dropped_days"] == 2
    assert nan["dsr"] == pytest.approx(st.deflated_sharpe(r[np.isfinite(r)], 100, 0.01)["dsr"])


# ------------------------------------------------------------------------------------------- daily returns
def test_daily_returns_from_each_days_last_bar() -> None:
    equity = np.array([100.0, 101.0, 99.0, 99.0, 110.0])
    day = np.array([5, 5, 6, 6, 7])
    r = st.daily_returns(equity, day, 100.0)
    assert r == pytest.approx([0.01, 99 / 101 - 1, 110 / 99 - 1])
    m = st.daily_returns(np.column_stack([equity, equity * 2]), day, 100.0)  # many curves at once
    assert m.shape == (3, 2) and m[:, 0] == pytest.approx(r)


# ------------------------------------------------------------------------------------------- bootstrap
def test_circular_block_bootstrap_wraps_and_is_seeded() -> None:
    x = np.arange(10.0)
    full = st.block_bootstrap_means(x, 50, 10, seed=1)  # one block of the whole length, any start, wrapping
    assert full == pytest.approx(np.full(50, 4.5))
    a = st.block_bootstrap_means(np.random.default_rng(0).normal(size=84), 5000, 4, seed=7)
    assert np.array_equal(a, st.block_bootstrap_means(np.random.default_rng(0).normal(size=84), 5000, 4, seed=7))
    assert st.block_length(84) == 4 and st.block_length(1) == 1


def test_paired_bootstrap_probabilities() -> None:
    rng = np.random.default_rng(5)
    old = rng.normal(0.0, 0.01, 84)
    better = st.paired_bootstrap(old + 0.01, old, 5000, seed=0)
    assert better["ok"] and better["prob_better"] == 1.0 and better["block"] == 4 and better["resamples"] == 5000
    diff = rng.normal(0.0, 0.01, 84)
    p = st.paired_bootstrap(old + diff - diff.mean(), old, 5000, seed=0)  # mean difference exactly 0
    assert 0.35 < p["prob_better"] < 0.65
    assert p["ci95"][0] < 0 < p["ci95"][1]
    assert st.paired_bootstrap(old + diff, old, 5000, seed=3)["prob_better"] == \
        st.paired_bootstrap(old + diff, old, 5000, seed=3)["prob_better"]  # seeded: same inputs, same number


def test_paired_bootstrap_edge_cases() -> None:
    x = np.random.default_rng(2).normal(0, 0.01, 60)
    same = st.paired_bootstrap(x, x.copy())
    assert same["ok"] and same["prob_better"] == 0.0 and "identical" in same["reason"]  # no evidence: never a pass
    one = st.paired_bootstrap(x[:1], x[:1])
    assert not one["ok"] and one["prob_better"] is None and "not enough days" in one["reason"]
    y = x + 0.001
    y[[0, 5, 9]] = np.nan
    nan = st.paired_bootstrap(y, x)
    assert nan["ok"] and nan["n_days"] == 57 and nan["dropped_days"] == 3 and nan["prob_better"] == 1.0
    with pytest.raises(ValueError):
        st.paired_bootstrap(x, x[:-1])


# ------------------------------------------------------------------------------------------- PBO
def _pbo_brute(m: np.ndarray, s: int) -> tuple[float, float]:
    """Direct CSCV (statistics note), no shortcuts: Sharpe with ddof 1, scipy ranks, every split."""
    t, n = m.shape
    size = t // s
    m = m[t - s * size:]
    blocks = np.split(m, s)
    lam, loss = [], []
    for J in combinations(range(s), s // 2):
        ins = np.vstack([blocks[i] for i in J])
        oos = np.vstack([blocks[i] for i in range(s) if i not in J])
        sr_is = ins.mean(0) / ins.std(0, ddof=1)
        sr_oos = oos.mean(0) / oos.std(0, ddof=1)
        best = int(np.argmax(sr_is))
        w = sps.rankdata(sr_oos)[best] / (n + 1)
        lam.append(math.log(w / (1 - w)))
        loss.append(oos[:, best].mean() < 0)
    return float(np.mean(np.array(lam) <= 0)), float(np.mean(loss))


def test_pbo_equals_brute_force() -> None:
    m = np.random.default_rng(11).normal(0.0, 0.01, (24, 7))
    got = st.pbo_cscv(m, 6)
    ref = _pbo_brute(m, 6)
    assert got["ok"] and got["n_splits"] == 20 and got["blocks"] == 6
    assert got["pbo"] == pytest.approx(ref[0]) and got["prob_oos_loss"] == pytest.approx(ref[1])


def test_pbo_noise_near_half_and_edge_near_zero() -> None:
    rng = np.random.default_rng(0)
    vals = [st.pbo_cscv(rng.normal(0.0, 0.01, (64, 200)), 8)["pbo"] for _ in range(12)]
    assert 0.4 < float(np.mean(vals)) < 0.6, vals
    m = rng.normal(0.0, 0.01, (64, 200))
    m[:, 17] += 0.01  # one configuration with a real edge
    edge = st.pbo_cscv(m, 16)
    assert edge["n_splits"] == 12870 and edge["pbo"] < 0.01 and edge["prob_oos_loss"] < 0.01


def test_pbo_short_windows_and_degenerate_matrices() -> None:
    rng = np.random.default_rng(4)
    m = rng.normal(0.0, 0.01, (15, 30))  # 15 days: 16 blocks impossible -> 6 blocks of 2 days (S even)
    r = st.pbo_cscv(m, 16)
    assert r["ok"] and r["blocks"] == 6 and r["block_days"] == 2 and r["dropped_days"] == 3
    short = st.pbo_cscv(m[:7], 16)
    assert not short["ok"] and short["pbo"] is None and "too short" in short["reason"]
    one = st.pbo_cscv(m[:, :1])
    assert not one["ok"] and "1 configuration" in one["reason"]
    m2 = m.copy()
    m2[:, 0] = 0.0  # a configuration that never trades: Sharpe 0, ranked, no crash
    m2[2, 5] = np.nan  # a NaN day counts as 0
    r2 = st.pbo_cscv(m2, 6)
    m3 = m2.copy()
    m3[2, 5] = 0.0
    assert r2["ok"] and r2["pbo"] == st.pbo_cscv(m3, 6)["pbo"]


# ------------------------------------------------------------------------------------------- direction
def test_auc_matches_mann_whitney_and_weighted_resamples() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(8)
    score = np.round(rng.normal(size=400), 1)  # ties on purpose
    y = rng.random(400) < 0.4
    assert st.auc(score, y) == pytest.approx(roc_auc_score(y, score))
    idx = rng.integers(0, 400, 400)
    w = np.bincount(idx, minlength=400).astype(float)[None, :]
    assert st._auc_weighted(score, y, w)[0] == pytest.approx(roc_auc_score(y[idx], score[idx]))


def test_directional_auc_knows_direction_from_volatility_timing() -> None:
    rng = np.random.default_rng(9)
    n = 6000
    label = rng.choice([-1, 0, 1], n, p=[0.3, 0.4, 0.3])
    decided = label != 0
    # "volatility timing": both probabilities high exactly where a barrier will be hit, direction unknown
    p_long = 0.3 + 0.2 * decided + rng.normal(0, 0.05, n)
    p_short = 0.3 + 0.2 * decided + rng.normal(0, 0.05, n)
    vol = st.directional_auc(p_long, p_short, label, resamples=300)
    assert vol["ok"] and vol["long_vs_rest"] > 0.75 and vol["short_vs_rest"] > 0.75
    assert vol["ci95"][0] < 0.5 < vol["ci95"][1] and abs(vol["long_vs_short"] - 0.5) < 0.03
    skill = st.directional_auc(p_long + 0.1 * label, p_short - 0.1 * label, label, resamples=300)
    assert skill["long_vs_short"] > 0.8 and skill["ci95"][0] > 0.5
    few = st.directional_auc(p_long[:30], p_short[:30], label[:30])
    assert not few["ok"] and "too few decided bars" in few["reason"] and few["long_vs_short"] is None
    invalid = st.directional_auc(p_long, p_short, label, valid=np.zeros(n, bool))
    assert not invalid["ok"] and invalid["n_bars"] == 0


def test_strip_private_is_json_ready() -> None:
    import json

    d = st.paired_bootstrap(np.arange(30.0) * 1e-3, np.zeros(30))
    assert "_means" in d
    json.dumps(st.strip_private({"a": d, "b": [np.float64(1.5), float("nan")]}), allow_nan=False)
