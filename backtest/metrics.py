"""Run metrics, the one score, and the commit gate of the weekly pipeline.

Metrics (all scale-free except ``net_profit``; computed from the marked equity at each bar's close and the trades):

* ``net_profit`` (account currency), ``return_pct`` = final / initial equity - 1, in %.
* ``max_drawdown_pct``: the largest fall of the marked equity below its running peak (the initial equity counts as
  the first peak), in %.
* ``sharpe`` / ``sortino``: of DAILY returns (UTC days of the decision clock, the equity at each day's last bar; the
  first day's return is measured from the initial equity), annualised by ``sqrt(365)`` because BTC trades 24/7.
  Sortino's downside deviation is ``sqrt(mean(min(r, 0)^2))`` over all days. 0 when undefined (fewer than 2 days or
  no variation).
* ``profit_factor`` = gross profit / gross loss (``inf`` with profits and no losses, 0 without trades);
  ``win_rate`` = share of trades with pnl > 0; ``trades``; ``avg_r`` = mean R multiple (pnl / planned risk incl.
  commissions); ``exposure_pct`` = bars touched by a position (entry bar through exit bar) / window bars;
  ``longest_losing_streak``; ``breaker_trips``.

Score (one formula; the gate and the sweep rank runs by it)::

    score = return_pct / max(max_drawdown_pct, 1.0) * trade_factor      if return_pct > 0
    score = return_pct / max(max_drawdown_pct, 1.0)                      otherwise
    trade_factor = min(1, trades / min_trades)

i.e. a Calmar-like "return per unit of worst drawdown". It rewards risk-adjusted return, penalises drawdown directly,
shrinks the reward of runs with fewer than ``min_trades`` trades (too little evidence), and never makes a losing run
look better (the factor only shrinks positive scores). Both terms are percentages, so the score does not depend on the
account size (doubling the initial equity gives the same score, up to lot rounding). It is positive exactly when the
run made money (and 0 for a run without trades). The 1 % drawdown floor keeps near-zero-drawdown runs from exploding.

Gate (:func:`gate`): with ``improvement = 0.02``: a positive baseline must be beaten by 2 % (``new >= baseline *
1.02``); a non-positive baseline must be improved by 2 % of its magnitude (``new >= baseline + 0.02 * |baseline|``);
no baseline (first run) passes on the floors alone; the profile's floors (``min_trades``, ``max_drawdown_pct``)
apply in all cases.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from core.config import RiskProfile

DD_FLOOR_PCT = 1.0
ANNUALISATION = math.sqrt(365.0)


def score(m: Mapping[str, Any], min_trades: int) -> float:
    """The documented score (module docstring) from a metrics mapping."""
    ret = float(m["return_pct"])
    dd = max(float(m["max_drawdown_pct"]), DD_FLOOR_PCT)
    s = ret / dd
    if ret > 0:
        s *= min(1.0, float(m["trades"]) / max(int(min_trades), 1))
    return float(s)


@njit(cache=True)
def _equity_stats(equity: np.ndarray, day: np.ndarray, initial: float) -> tuple[float, float, float, float, int]:
    """One pass over the curve: (max drawdown %, mean, sample std and downside deviation of the daily returns, days).

    Compiled because the sweep and the Optuna objectives score every trial: numpy needed ~3.5 ms per 140k bars."""
    peak = initial
    dd = 0.0
    n_days = 0
    s1 = 0.0
    sd = 0.0
    prev = initial
    mean = 0.0
    m2 = 0.0
    for i in range(equity.size):
        e = equity[i]
        if e > peak:
            peak = e
        elif peak - e > dd * peak and peak > 0.0:  # multiply to test, divide only on a new maximum
            dd = (peak - e) / peak
        if i == equity.size - 1 or day[i + 1] != day[i]:  # last bar of a UTC day: one daily return
            if prev != 0.0:
                r = e / prev - 1.0
                if np.isfinite(r):
                    n_days += 1
                    delta = r - mean  # Welford: stable mean / variance
                    mean += delta / n_days
                    m2 += delta * (r - mean)
                    s1 += r
                    if r < 0.0:
                        sd += r * r
            prev = e
    std = np.sqrt(m2 / (n_days - 1)) if n_days >= 2 else 0.0
    down = np.sqrt(sd / n_days) if n_days >= 1 else 0.0
    return dd * 100.0, (s1 / n_days if n_days >= 1 else 0.0), std, down, n_days


@njit(cache=True)
def _trade_stats(pnl: np.ndarray) -> tuple[float, float, int, int]:
    """(gross profit, gross loss, wins, longest losing streak) in one pass."""
    gp = 0.0
    gl = 0.0
    wins = 0
    cur = 0
    longest = 0
    for v in pnl:
        if v > 0.0:
            gp += v
            wins += 1
        elif v < 0.0:
            gl -= v
        cur = cur + 1 if v < 0.0 else 0
        if cur > longest:
            longest = cur
    return gp, gl, wins, longest


def compute_metrics(equity: np.ndarray, day: np.ndarray, pnl: np.ndarray, r_mult: np.ndarray,
                    entry_bar: np.ndarray, exit_bar: np.ndarray, initial_equity: float, n_trips: int,
                    min_trades: int) -> dict[str, Any]:
    """All metrics plus ``score`` (see the module docstring). Plain floats/ints, ready for JSON."""
    n = int(equity.size)
    final = float(equity[-1]) if n else float(initial_equity)
    dd, mu, sd, down, n_days = _equity_stats(np.ascontiguousarray(equity, dtype=np.float64),
                                             np.ascontiguousarray(day, dtype=np.int64), float(initial_equity))
    sharpe = mu / sd * ANNUALISATION if n_days >= 2 and sd > 0 else 0.0
    sortino = mu / down * ANNUALISATION if n_days >= 2 and down > 0 else 0.0
    gp, gl, wins, longest = _trade_stats(np.ascontiguousarray(pnl, dtype=np.float64))
    pf = gp / gl if gl > 0 else (math.inf if gp > 0 else 0.0)
    exposure = float(np.sum(exit_bar - entry_bar + 1)) / n * 100.0 if n else 0.0
    m: dict[str, Any] = {
        "net_profit": final - float(initial_equity),
        "return_pct": (final / float(initial_equity) - 1.0) * 100.0,
        "max_drawdown_pct": float(dd),
        "sharpe": float(sharpe),
        "sortino": float(sortino),
        "profit_factor": pf,
        "win_rate": float(wins / pnl.size) if pnl.size else 0.0,
        "trades": int(pnl.size),
        "avg_r": float(r_mult.mean()) if r_mult.size else 0.0,
        "exposure_pct": exposure,
        "longest_losing_streak": int(longest),
        "breaker_trips": int(n_trips),
        "bars": n,
        "min_trades": int(min_trades),
    }
    m["score"] = score(m, min_trades)
    return m


def json_safe(m: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics with non-finite floats replaced by None (strict JSON has no Infinity)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}


# ------------------------------------------------------------------------------------------------------- gate
@dataclass(frozen=True)
class Floors:
    """Absolute floors of the gate, from the active risk profile."""

    min_trades: int
    max_drawdown_pct: float
    min_score: float | None = None  # the new score must be strictly above it (0: the OOS run must make money)

    @classmethod
    def from_profile(cls, profile: RiskProfile) -> Floors:
        return cls(min_trades=int(profile.min_trades), max_drawdown_pct=float(profile.max_drawdown_pct),
                   min_score=float(profile.min_score))


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    threshold: float | None  # the score the new run had to reach (None: first run, floors only)
    explanation: str = ""  # the arithmetic in words, for the report and the registry/git message


def _score_of(x: float | Mapping[str, Any]) -> float:
    return float(x["score"]) if isinstance(x, Mapping) else float(x)


def gate(new: Mapping[str, Any], baseline: float | Mapping[str, Any] | None, floors: Floors,
         improvement: float = 0.02) -> GateDecision:
    """Decide whether the new run may replace the baseline (rules in the module docstring).

    ``new`` is the new run's metrics (needs ``score``, ``trades``, ``max_drawdown_pct``); ``baseline`` the deployed
    run's score (or its metrics), or None on the first run. Floors are checked first so the reason names them.
    The decision carries its own ``explanation`` (the arithmetic the report shows), built here where the numbers are.
    """
    dec = _decide(new, baseline, floors, improvement)
    b = baseline.get("score") if isinstance(baseline, Mapping) else baseline
    if b is None:
        text = (f"first run: floors only (trades {new['trades']} >= {floors.min_trades}, max DD "
                f"{new['max_drawdown_pct']:.2f}% <= {floors.max_drawdown_pct}%)")
    elif dec.threshold is None:
        text = dec.reason
    elif b > 0:
        text = f"new {_score_of(new):.4f} >= baseline {b:.4f} x {1 + improvement:.2f} = {dec.threshold:.4f}"
    else:
        text = f"new {_score_of(new):.4f} >= baseline {b:.4f} + {improvement} x |{b:.4f}| = {dec.threshold:.4f}"
    return dataclasses.replace(dec, explanation=text)


def _decide(new: Mapping[str, Any], baseline: float | Mapping[str, Any] | None, floors: Floors,
            improvement: float) -> GateDecision:
    s_new = _score_of(new)
    trades = int(new["trades"])
    dd = float(new["max_drawdown_pct"])
    if trades < floors.min_trades:
        return GateDecision(False, f"floor: {trades} trades < min_trades {floors.min_trades}", None)
    if dd > floors.max_drawdown_pct:
        return GateDecision(False, f"floor: max drawdown {dd:.2f}% > {floors.max_drawdown_pct:.2f}%", None)
    if not math.isfinite(s_new):
        return GateDecision(False, "new score is not finite", None)
    if floors.min_score is not None and s_new <= floors.min_score:
        return GateDecision(False, f"floor: score {s_new:.4f} <= min_score {floors.min_score:g} (a set that loses "
                                   f"money on the OOS window is never deployed)", None)
    if baseline is None:
        return GateDecision(True, f"first run: floors met (score {s_new:.4f})", None)
    b = _score_of(baseline)
    thr = b * (1.0 + improvement) if b > 0 else b + improvement * abs(b)
    if s_new >= thr:
        return GateDecision(True, f"score {s_new:.4f} >= threshold {thr:.4f} (baseline {b:.4f})", thr)
    return GateDecision(False, f"score {s_new:.4f} < threshold {thr:.4f} (baseline {b:.4f})", thr)
