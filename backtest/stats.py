"""Statistics for a gate that knows how much searching it did: pure numpy/scipy functions, no I/O.

Why this module exists: the weekly job tries a hundred Optuna trials and hundreds of sweep configurations, then
compares the best of them with the deployed set on a window that is mostly the sweep's own. The best of many noisy
tries always looks good; these functions measure *how* surprising a result is given the search that produced it
(formulas and reference values: ``../shared/notes/statistics.md``):

* :func:`daily_returns` - returns from an equity curve at each UTC day's last bar (a flat day counts as 0);
* :func:`paired_bootstrap` - a circular moving-block bootstrap of the mean daily-return difference of two sets on
  the same days (Politis and Romano): P(challenger beats champion);
* :func:`probabilistic_sharpe` / :func:`expected_max_sharpe` / :func:`deflated_sharpe` - Bailey and Lopez de Prado
  (2014): the Sharpe ratio's standard error with skew and kurtosis, and the Sharpe ratio the best of N trials
  reaches by luck;
* :func:`pbo_cscv` - probability of backtest overfitting by combinatorially symmetric cross-validation (Bailey,
  Borwein, Lopez de Prado and Zhu, 2015);
* :func:`directional_auc` - does the signal know the direction, among bars where a barrier decided?

Every function returns a plain dict with ``ok`` (bool) and ``reason`` (None, or one sentence saying why the number
could not be computed: too few days, no variation, ...). A statistic that cannot be computed is never a pass: the
gate treats ``ok = False`` as a failed condition and names the reason. Arrays meant for plots sit under keys starting
with ``_`` (the pipeline strips them before writing JSON).
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

import numpy as np
from numba import njit
from scipy import stats as sps

EULER_GAMMA = 0.5772156649015329
MIN_DAYS = 20  # below this a daily Sharpe ratio or a bootstrap of daily means says nothing (statistics note)
PBO_MIN_BLOCK_DAYS = 2  # each CSCV block must hold at least this many days
PBO_MIN_BLOCKS = 4  # C(4, 2) = 6 splits: below this CSCV is not a test


def _fail(reason: str, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "reason": reason, **extra}


# --------------------------------------------------------------------------------------------- daily returns
def day_ends(day: np.ndarray) -> np.ndarray:
    """Positions of the last bar of every UTC day in ``day`` (a per-bar day number; the window's last bar ends the
    last day). Identical for every run on the same window, so the sweep computes it once."""
    day = np.asarray(day)
    if day.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[day[1:] != day[:-1], True]).astype(np.int64)


def daily_returns(equity: np.ndarray, day: np.ndarray, initial: float, ends: np.ndarray | None = None) -> np.ndarray:
    """Daily returns from the marked equity at each day's last bar; the first day's is measured from ``initial``.

    Same definition as the Sharpe ratio in :mod:`backtest.metrics`. Works on one curve (1-D) or on many curves at
    once (2-D: bars x configurations, the sweep's matrix)."""
    ends = day_ends(day) if ends is None else ends
    eq = np.asarray(equity, dtype=np.float64)
    at = eq[ends]
    prev = np.concatenate([np.full((1,) + at.shape[1:], float(initial)), at[:-1]], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return at / prev - 1.0


# --------------------------------------------------------------------------------------------- bootstrap
def block_length(n: int) -> int:
    """About n^(1/3) (Politis and White's order for the circular block bootstrap of a mean), at least 1."""
    return max(1, int(round(n ** (1.0 / 3.0))))


def block_bootstrap_means(x: np.ndarray, resamples: int, block: int, seed: int) -> np.ndarray:
    """Means of ``resamples`` circular moving-block resamples of ``x``: blocks of ``block`` consecutive values
    starting at uniform positions, wrapping around the end, until ``len(x)`` values."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    k = -(-n // block)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    offs = np.arange(block)
    step = max(1, 2_000_000 // max(n, 1))  # bound memory: step x n indices at a time
    for a in range(0, resamples, step):
        b = min(resamples, a + step)
        starts = rng.integers(0, n, size=(b - a, k))
        idx = ((starts[:, :, None] + offs) % n).reshape(b - a, k * block)[:, :n]
        means[a:b] = x[idx].mean(axis=1)
    return means


def paired_bootstrap(r_new: np.ndarray, r_old: np.ndarray, resamples: int = 5000, seed: int = 0,
                     margin: float = 0.0, block: int | None = None, min_days: int = MIN_DAYS) -> dict[str, Any]:
    """P(challenger beats champion): the share of block-bootstrap resamples of the mean daily difference
    ``d = r_new - r_old`` (same days) that exceed ``margin``.

    Days where either return is NaN are dropped (and counted). Identical curves give 0: no evidence of being
    better is never a pass."""
    a = np.asarray(r_new, dtype=np.float64)
    b = np.asarray(r_old, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired returns need the same days: shapes {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = int(d.size)
    base = {"n_days": n, "dropped_days": int(keep.size - n), "resamples": int(resamples), "seed": int(seed),
            "margin": float(margin)}
    if n < min_days:
        return _fail(f"not enough days: {n} paired days (need {min_days})", **base, prob_better=None)
    L = int(block) if block else block_length(n)
    obs = float(d.mean())
    if float(np.ptp(d)) == 0.0:  # no variation: every resample equals the observed mean
        prob = 1.0 if obs > margin else 0.0
        means = np.full(int(resamples), obs)
        why = None if obs != 0.0 else "the two sets made identical daily returns"
        return {"ok": True, "reason": why, **base, "block": L, "prob_better": prob, "observed_mean": obs,
                "ci95": [obs, obs], "_means": means}
    means = block_bootstrap_means(d, int(resamples), L, int(seed))
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"ok": True, "reason": None, **base, "block": L, "prob_better": float(np.mean(means > margin)),
            "observed_mean": obs, "ci95": [float(lo), float(hi)], "_means": means}


# --------------------------------------------------------------------------------------------- Sharpe
def sharpe_moments(r: np.ndarray) -> tuple[float, int, float, float]:
    """(per-period Sharpe ratio, T, skewness, kurtosis NOT excess) of finite returns; NaN Sharpe without variation."""
    r = np.asarray(r, dtype=np.float64)
    r = r[np.isfinite(r)]
    t = int(r.size)
    if t < 2:
        return math.nan, t, math.nan, math.nan
    sd = float(r.std(ddof=1))
    if sd == 0.0 or not math.isfinite(sd):
        return math.nan, t, math.nan, math.nan
    sr = float(r.mean()) / sd
    g3 = float(sps.skew(r, bias=True))
    g4 = float(sps.kurtosis(r, fisher=False, bias=True))
    return sr, t, g3, g4


def probabilistic_sharpe(sr: float, t: int, skew: float = 0.0, kurt: float = 3.0, sr_star: float = 0.0) -> float:
    """PSR(SR*) = Phi((SR - SR*) sqrt(T - 1) / sqrt(1 - g3 SR + (g4 - 1)/4 SR^2)); all per period, g4 not excess."""
    if t < 2 or not all(math.isfinite(v) for v in (sr, skew, kurt, sr_star)):
        return math.nan
    var = 1.0 - skew * sr + (kurt - 1.0) / 4.0 * sr * sr
    if var <= 0.0:
        return math.nan
    return float(sps.norm.cdf((sr - sr_star) * math.sqrt(t - 1) / math.sqrt(var)))


def expected_max_sharpe(n_trials: int, var_trials: float) -> float:
    """SR0: the Sharpe ratio the best of ``n_trials`` independent trials reaches by luck (per period)."""
    if n_trials < 2 or not math.isfinite(var_trials) or var_trials <= 0.0:
        return 0.0
    z = (1.0 - EULER_GAMMA) * sps.norm.ppf(1.0 - 1.0 / n_trials) \
        + EULER_GAMMA * sps.norm.ppf(1.0 - 1.0 / (n_trials * math.e))
    return float(math.sqrt(var_trials) * z)


def deflated_sharpe(r: np.ndarray, n_trials: int, var_trials: float, min_days: int = MIN_DAYS) -> dict[str, Any]:
    """DSR = PSR(SR0) of the returns ``r`` (per period), with N = ``n_trials`` configurations evaluated and the
    variance ``var_trials`` of their Sharpe ratios (same period). N counts near-copies as separate trials, so SR0 is
    an upper bound of the luck a search of this size buys (the paper clusters trials; we do not)."""
    sr, t, g3, g4 = sharpe_moments(r)
    n_nan = int(np.size(r) - t)
    base = {"n_days": t, "dropped_days": n_nan, "n_trials": int(n_trials), "var_trials": float(var_trials)}
    if t < min_days:
        return _fail(f"not enough days: {t} days with a return (need {min_days})", **base, dsr=None)
    if not math.isfinite(sr):
        return _fail("the daily returns have no variation (no trades, or a flat curve): no Sharpe ratio", **base,
                     dsr=None)
    if n_trials < 1:
        return _fail("no trials counted", **base, dsr=None)
    sr0 = expected_max_sharpe(int(n_trials), float(var_trials))
    dsr = probabilistic_sharpe(sr, t, g3, g4, sr0)
    if not math.isfinite(dsr):
        return _fail("the Sharpe ratio's standard error is undefined for these skew/kurtosis values", **base,
                     dsr=None, sharpe=sr, skew=g3, kurtosis=g4, sr0=sr0)
    return {"ok": True, "reason": None, **base, "dsr": dsr, "sharpe": sr, "sharpe_annual": sr * math.sqrt(365.0),
            "skew": g3, "kurtosis": g4, "sr0": sr0, "sr0_annual": sr0 * math.sqrt(365.0),
            "psr0": probabilistic_sharpe(sr, t, g3, g4, 0.0)}


def trial_sharpes(matrix: np.ndarray) -> np.ndarray:
    """Per-period Sharpe ratio of every column of a days x configurations return matrix (0 without variation:
    a configuration that never trades has no Sharpe ratio; the note says rank it as 0)."""
    m = np.nan_to_num(np.asarray(matrix, dtype=np.float64), nan=0.0)
    if m.shape[0] < 2:
        return np.zeros(m.shape[1])
    sd = m.std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sr = np.where(sd > 0, m.mean(axis=0) / np.where(sd > 0, sd, 1.0), 0.0)
    return sr


# --------------------------------------------------------------------------------------------- PBO (CSCV)
def cscv_blocks(n_days: int, s_max: int = 16, min_block_days: int = PBO_MIN_BLOCK_DAYS) -> int:
    """The number of CSCV blocks: ``s_max``, fewer when the window is short, always even (0: too short)."""
    s = min(int(s_max), n_days // max(1, min_block_days))
    s -= s % 2
    return s if s >= PBO_MIN_BLOCKS else 0


def pbo_cscv(matrix: np.ndarray, s_max: int = 16, min_block_days: int = PBO_MIN_BLOCK_DAYS,
             sample_splits: int = 48) -> dict[str, Any]:
    """Probability of backtest overfitting of the selection "take the configuration with the best Sharpe ratio".

    ``matrix``: days x configurations of daily returns (NaN days count as 0). The days are cut into S contiguous
    blocks (S even; the remainder days at the start are dropped so that all blocks are equal); for every one of the
    C(S, S/2) choices of S/2 blocks as in-sample, the in-sample best configuration n* is ranked among all N
    out-of-sample (1 = worst, N = best, ties share the mean rank), w = rank / (N + 1), lambda = ln(w / (1 - w)).
    PBO = share of splits with lambda <= 0 (the in-sample winner is no better than the median out of sample);
    ``prob_oos_loss`` = share of splits where n* lost money out of sample (mean daily return < 0).

    Block sums are computed once and added per split (compiled loop over splits and configurations)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError("pbo_cscv needs a days x configurations matrix")
    t, n = m.shape
    base = {"n_days": int(t), "n_configs": int(n)}
    if n < 2:
        return _fail(f"only {n} configuration(s): nothing to overfit by choosing", **base, pbo=None)
    s = cscv_blocks(t, s_max, min_block_days)
    if s == 0:
        return _fail(f"window too short for CSCV: {t} days make fewer than {PBO_MIN_BLOCKS} blocks of "
                     f"{min_block_days} days", **base, pbo=None)
    m = np.nan_to_num(m, nan=0.0)
    size = t // s
    m = m[t - s * size:]  # drop the oldest remainder days: equal blocks
    blocks = m.reshape(s, size, n)
    s1 = blocks.sum(axis=1)  # S x N
    s2 = (blocks * blocks).sum(axis=1)
    splits = np.array(list(combinations(range(s), s // 2)), dtype=np.int64)
    half = size * (s // 2)
    logits, oos_ret, is_sr_best, oos_sr_best = _cscv_kernel(s1, s2, splits, float(half))
    # the rank scatter: every configuration's in-sample vs out-of-sample relative rank on a few evenly spaced splits
    pick = np.unique(np.linspace(0, len(splits) - 1, min(sample_splits, len(splits))).astype(np.int64))
    rank_pairs = []
    for j in pick:
        ind = np.zeros(s, dtype=bool)
        ind[splits[j]] = True
        rank_pairs.append(np.stack([_rel_rank(_half_sharpe(s1[ind].sum(0), s2[ind].sum(0), half)),
                                    _rel_rank(_half_sharpe(s1[~ind].sum(0), s2[~ind].sum(0), half))]))
    pbo = float(np.mean(logits <= 0.0))
    return {"ok": True, "reason": None, **base, "blocks": int(s), "block_days": int(size),
            "dropped_days": int(t - s * size), "n_splits": int(len(splits)), "pbo": pbo,
            "prob_oos_loss": float(np.mean(oos_ret < 0.0)), "logit_median": float(np.median(logits)),
            "_logits": logits, "_is_sharpe_best": is_sr_best, "_oos_sharpe_best": oos_sr_best,
            "_rank_pairs": np.stack(rank_pairs) if rank_pairs else np.zeros((0, 2, n))}


def _half_sharpe(a1: np.ndarray, a2: np.ndarray, half: int) -> np.ndarray:
    """Sharpe ratio (up to the constant factor that ranking ignores) from sums and sums of squares of ``half`` days;
    0 without variation."""
    var = half * a2 - a1 * a1
    ok = var > 1e-18 * np.maximum(1.0, a1 * a1)
    return np.where(ok, a1 / np.sqrt(np.where(ok, var, 1.0)), 0.0)


@njit(cache=True)
def _cscv_kernel(s1: np.ndarray, s2: np.ndarray, splits: np.ndarray, half: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every split: logit of the OOS relative rank of the IS-best configuration, its OOS sum of returns, and its
    IS / OOS Sharpe-like ratios (the same ratio as :func:`_half_sharpe`). One pass per split, no temporaries: numpy
    needed ~5 s for 12,870 splits x 864 configurations, this ~0.3 s."""
    n_splits, k = splits.shape
    n = s1.shape[1]
    tot1 = s1.sum(axis=0)
    tot2 = s2.sum(axis=0)
    i1 = np.empty(n)
    i2 = np.empty(n)
    oos = np.empty(n)
    logits = np.empty(n_splits)
    oos_ret = np.empty(n_splits)
    is_best = np.empty(n_splits)
    oos_best = np.empty(n_splits)
    for q in range(n_splits):
        i1[:] = 0.0
        i2[:] = 0.0
        for c in range(k):
            b = splits[q, c]
            for j in range(n):
                i1[j] += s1[b, j]
                i2[j] += s2[b, j]
        best = 0
        best_sr = -np.inf
        for j in range(n):
            var = half * i2[j] - i1[j] * i1[j]
            sr = i1[j] / np.sqrt(var) if var > 1e-18 * max(1.0, i1[j] * i1[j]) else 0.0
            if sr > best_sr:  # ties: the first configuration (the sweep table's order)
                best_sr = sr
                best = j
        for j in range(n):
            a1 = tot1[j] - i1[j]
            var = half * (tot2[j] - i2[j]) - a1 * a1
            oos[j] = a1 / np.sqrt(var) if var > 1e-18 * max(1.0, a1 * a1) else 0.0
        ob = oos[best]
        less = 0
        equal = 0
        for j in range(n):
            if oos[j] < ob:
                less += 1
            elif oos[j] == ob:
                equal += 1
        w = (less + (equal + 1) / 2.0) / (n + 1.0)
        logits[q] = np.log(w / (1.0 - w))
        oos_ret[q] = tot1[best] - i1[best]
        is_best[q] = best_sr
        oos_best[q] = ob
    return logits, oos_ret, is_best, oos_best


def _rel_rank(x: np.ndarray) -> np.ndarray:
    """Relative ranks in (0, 1): rank / (N + 1), ties averaged."""
    return sps.rankdata(x) / (x.size + 1.0)


# --------------------------------------------------------------------------------------------- direction
def auc(score: np.ndarray, target: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN when a class is missing."""
    y = np.asarray(target, dtype=bool)
    n1 = int(y.sum())
    n0 = int(y.size - n1)
    if n1 == 0 or n0 == 0:
        return math.nan
    r = sps.rankdata(score)
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def _auc_weighted(score: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of every row of ``weights`` (resamples x n multiplicities of the n observations), ties counted half.

    Why: a bootstrap resample is the original sample with multiplicities, so one sort of the scores serves every
    resample (O(n) per resample instead of re-ranking it)."""
    o = np.argsort(score, kind="mergesort")
    ss = score[o]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])  # groups of tied scores
    w = weights[:, o]
    pos = target[o].astype(bool)
    wp = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)
    wn = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    p_tot, n_tot = wp.sum(axis=1), wn.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((p_tot > 0) & (n_tot > 0), (wp * (below + 0.5 * wn)).sum(axis=1) / (p_tot * n_tot), np.nan)


def directional_auc(p_long: np.ndarray, p_short: np.ndarray, label: np.ndarray, valid: np.ndarray | None = None,
                    resamples: int = 1000, seed: int = 0, min_each: int = 20) -> dict[str, Any]:
    """Directional skill of a signal over bars in time order.

    * ``long_vs_short``: among bars where a barrier decided (label +1 or -1), the AUC of ``p_long - p_short`` for
      "long won"; 0.5 = no idea of the direction. Its 95% interval comes from a circular block bootstrap of the
      decided bars (labels of neighbouring bars overlap, so bars are not independent).
    * ``long_vs_rest`` / ``short_vs_rest``: the usual one-vs-rest AUCs over every valid bar. They can sit above 0.5
      from predicting *whether* a barrier is hit (volatility timing) without knowing which one: direction pays."""
    pl = np.asarray(p_long, dtype=np.float64)
    ps = np.asarray(p_short, dtype=np.float64)
    lab = np.asarray(label)
    ok = np.isfinite(pl) & np.isfinite(ps)
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    decided = ok & (lab != 0)
    n_long = int((decided & (lab == 1)).sum())
    n_short = int((decided & (lab == -1)).sum())
    out: dict[str, Any] = {"n_bars": int(ok.sum()), "n_decided": int(decided.sum()), "n_long": n_long,
                           "n_short": n_short, "resamples": int(resamples), "seed": int(seed),
                           "long_vs_rest": auc(pl[ok], lab[ok] == 1) if ok.any() else None,
                           "short_vs_rest": auc(ps[ok], lab[ok] == -1) if ok.any() else None}
    for k in ("long_vs_rest", "short_vs_rest"):
        if out[k] is not None and not math.isfinite(out[k]):
            out[k] = None
    if min(n_long, n_short) < min_each:
        return _fail(f"too few decided bars: {n_long} long and {n_short} short wins (need {min_each} of each)",
                     **out, long_vs_short=None, ci95=None)
    sc = (pl - ps)[decided]
    y = lab[decided] == 1
    obs = auc(sc, y)
    n = sc.size
    L = block_length(n)
    rng = np.random.default_rng(seed)
    k = -(-n // L)
    vals = []
    step = max(1, 2_000_000 // n)
    for a in range(0, resamples, step):
        b = min(resamples, a + step)
        starts = rng.integers(0, n, size=(b - a, k))
        idx = ((starts[:, :, None] + np.arange(L)) % n).reshape(b - a, k * L)[:, :n]
        counts = np.bincount((idx + n * np.arange(b - a)[:, None]).ravel(), minlength=(b - a) * n)
        vals.append(_auc_weighted(sc, y, counts.reshape(b - a, n).astype(np.float64)))
    boot = np.concatenate(vals)
    boot = boot[np.isfinite(boot)]
    lo, hi = (np.quantile(boot, [0.025, 0.975]) if boot.size else (math.nan, math.nan))
    return {"ok": True, "reason": None, **out, "long_vs_short": obs, "ci95": [float(lo), float(hi)], "block": L}


def strip_private(d: Any) -> Any:
    """A copy without the ``_``-prefixed plot arrays, numpy scalars as Python numbers (ready for JSON)."""
    if isinstance(d, dict):
        return {k: strip_private(v) for k, v in d.items() if not str(k).startswith("_")}
    if isinstance(d, (list, tuple)):
        return [strip_private(v) for v in d]
    if isinstance(d, np.generic):
        return d.item()
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d


# --------------------------------------------------------------------------------------------- all evidence
def result_daily_returns(equity: Any, initial: float) -> np.ndarray:
    """Daily returns of a backtest's marked equity Series (UTC days of the decision clock, rule R1)."""
    from backtest.policy import decision_clock

    _, day = decision_clock(equity.index.as_unit("ns").asi8)
    return daily_returns(np.asarray(equity, dtype=np.float64), day, float(initial))


def gate_evidence(new_daily: dict[str, np.ndarray], base_daily: dict[str, np.ndarray] | None,
                  sweep_daily: np.ndarray | None, n_optuna: int, holdout: dict[str, Any],
                  direction: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None, *,
                  resamples: int = 5000, seed: int = 0, pbo_blocks: int = 16,
                  direction_resamples: int = 1000,
                  no_baseline: str = "first run: no deployed set to compare with") -> dict[str, Any]:
    """The gate's five pieces of evidence from daily returns (one function for the weekly job and the tests).

    ``new_daily`` / ``base_daily``: {"full": ..., "holdout": ...} daily returns of the challenger and the champion on
    the same days (``base_daily`` None on a first run); ``sweep_daily``: the sweep's days x configurations matrix;
    ``n_optuna``: Optuna trials the run finished; ``holdout``: {"new": metrics, "baseline": metrics or None};
    ``direction``: (p_long, p_short, label, valid) on the OOS bars; ``no_baseline``: why the paired comparison is
    missing when ``base_daily`` is None. Plot arrays stay under ``_`` keys."""
    out: dict[str, Any] = {"holdout": holdout}
    if base_daily is not None:
        for key, win in (("paired_full", "full"), ("paired_holdout", "holdout")):
            out[key] = paired_bootstrap(new_daily[win], base_daily[win], resamples, seed)
    else:
        for key in ("paired_full", "paired_holdout"):
            out[key] = _fail(no_baseline, prob_better=None)
    if sweep_daily is None or sweep_daily.ndim != 2 or sweep_daily.shape[1] == 0:
        out["dsr"] = _fail("no sweep returns (the sweep did not run)", dsr=None)
        out["pbo"] = _fail("no sweep returns (the sweep did not run)", pbo=None)
    else:
        srs = trial_sharpes(sweep_daily)
        var = float(np.var(srs, ddof=1)) if srs.size > 1 else 0.0
        n_sweep = int(sweep_daily.shape[1])
        out["dsr"] = deflated_sharpe(new_daily["full"], int(n_optuna) + n_sweep, var)
        out["dsr"].update({"n_optuna_trials": int(n_optuna), "n_sweep_rows": n_sweep})
        out["pbo"] = pbo_cscv(sweep_daily, pbo_blocks)
    if direction is not None:
        out["direction"] = directional_auc(*direction, resamples=direction_resamples, seed=seed)
    else:
        out["direction"] = _fail("no signal probabilities given", long_vs_short=None)
    return out
