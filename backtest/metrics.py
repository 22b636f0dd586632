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

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from backtest.stats import day_ends
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


@njit(cache=True, inline="always")
def drawdown_step(e: float, peak: float, dd: float) -> tuple[float, float]:
    """One bar of the running max drawdown (a fraction): ``(peak, dd)`` after equity ``e``. The one implementation:
    :func:`_curve_stats` walks a curve with it and the fast kernel (``backtest/nb.py``) calls it where it marks the
    equity, so the two give the same float. A repeated value changes nothing (a flat stretch is checked once)."""
    if e > peak:
        return e, dd
    if peak - e > dd * peak and peak > 0.0:  # multiply to test, divide only on a new maximum
        return peak, (peak - e) / peak
    return peak, dd


@njit(cache=True, nogil=True)
def _curve_stats(equity: np.ndarray, ends: np.ndarray, initial: float, dd: float,
                 pnl: np.ndarray, entry: np.ndarray, exit_: np.ndarray) -> tuple[float, float, float, float, int,
                                                                                    float, float, int, int, int]:
    """Every number of the metrics in one compiled call: (max drawdown %, mean, sample std and downside deviation
    of the daily returns, days, gross profit, gross loss, wins, longest losing streak, bars in position).

    ``dd < 0`` means "walk the curve for the drawdown"; the fast kernel passes the one it measured while marking
    the equity (so a sweep trial reads ~1.5k day ends instead of 140k bars). Daily returns use the equity at each
    day's last bar (``ends``, positions in ``equity``), the first day's measured from ``initial``."""
    if dd < 0.0:
        peak = initial
        dd = 0.0
        for i in range(equity.size):
            peak, dd = drawdown_step(equity[i], peak, dd)
    n_days = 0
    s1 = 0.0
    sd = 0.0
    prev = initial
    mean = 0.0
    m2 = 0.0
    for k in range(ends.size):
        e = equity[ends[k]]
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
    held = 0
    for j in range(entry.size):
        held += exit_[j] - entry[j] + 1
    return (dd * 100.0, (s1 / n_days if n_days >= 1 else 0.0), std, down, n_days, gp, gl, wins, longest,
            int(held))


def compute_metrics(equity: np.ndarray, day: np.ndarray, pnl: np.ndarray, r_mult: np.ndarray,
                    entry_bar: np.ndarray, exit_bar: np.ndarray, initial_equity: float, n_trips: int,
                    min_trades: int, *, max_drawdown: float | None = None,
                    ends: np.ndarray | None = None) -> dict[str, Any]:
    """All metrics plus ``score`` (see the module docstring). Plain floats/ints, ready for JSON.

    ``max_drawdown`` (a fraction) is the fast kernel's own measurement of this curve's drawdown (the same float);
    ``ends`` the positions of the days' last bars in ``equity`` (``backtest.stats.day_ends(day)``, which the
    sweep computes once per window). Without them both are computed here."""
    n = int(equity.size)
    final = float(equity[-1]) if n else float(initial_equity)
    if ends is None:
        ends = day_ends(day)
    dd, mu, sd, down, n_days, gp, gl, wins, longest, held = _curve_stats(
        np.asarray(equity, dtype=np.float64), np.asarray(ends, dtype=np.int64), float(initial_equity),
        -1.0 if max_drawdown is None else float(max_drawdown), np.asarray(pnl, dtype=np.float64),
        np.asarray(entry_bar, dtype=np.int64), np.asarray(exit_bar, dtype=np.int64))
    sharpe = mu / sd * ANNUALISATION if n_days >= 2 and sd > 0 else 0.0
    sortino = mu / down * ANNUALISATION if n_days >= 2 and down > 0 else 0.0
    pf = gp / gl if gl > 0 else (math.inf if gp > 0 else 0.0)
    exposure = float(held) / n * 100.0 if n else 0.0
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
class GateRules:
    """What the gate asks beyond the seed's rule and the floors (``pipeline.gate`` in config.json).

    ``mode = "seed"`` is the seed project's gate (the 2 % rule and the floors only), kept selectable so that the two
    can be compared (the walk-forward replay does). ``"default"`` adds the four conditions that know how much the run
    searched: the paired bootstrap, the deflated Sharpe ratio, PBO and the holdout."""

    mode: str = "default"
    improvement: float = 0.02
    min_prob_better: float = 0.90
    min_dsr: float = 0.50
    max_pbo: float = 0.50
    holdout_not_worse: bool = True

    @classmethod
    def seed(cls, improvement: float = 0.02) -> GateRules:
        return cls(mode="seed", improvement=improvement)

    @classmethod
    def from_config(cls, pipeline: Any) -> GateRules:
        """From a ``PipelineCfg`` (``gate_improvement`` + the ``gate`` block)."""
        g = pipeline.gate
        return cls(mode=g.mode, improvement=float(pipeline.gate_improvement), min_prob_better=g.min_prob_better,
                   min_dsr=g.min_dsr, max_pbo=g.max_pbo, holdout_not_worse=g.holdout_not_worse)


@dataclass(frozen=True)
class Condition:
    """One line of "why this decision": the number, the threshold, pass/fail, and what it means for a trader."""

    name: str
    passed: bool
    value: float | None
    threshold: float | None
    rule: str  # the arithmetic, e.g. "P(better) 0.63 >= 0.90"
    meaning: str  # the same in a trader's words

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "value": _finite_or_none(self.value),
                "threshold": _finite_or_none(self.threshold), "rule": self.rule, "meaning": self.meaning}


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    threshold: float | None  # the score the new run had to reach (None: first run, floors only)
    conditions: tuple[Condition, ...] = ()
    mode: str = "seed"

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.conditions if not c.passed]

    @property
    def arithmetic(self) -> str:
        """Every condition's arithmetic on one line (the report's and the Hub commit message's gate line)."""
        return "; ".join(f"{c.rule} [{'ok' if c.passed else 'FAIL'}]" for c in self.conditions)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "mode": self.mode, "reason": self.reason,
                "threshold": _finite_or_none(self.threshold), "arithmetic": self.arithmetic,
                "failed": self.failed, "conditions": [c.to_dict() for c in self.conditions]}


def _finite_or_none(v: float | None) -> float | None:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _score_of(x: float | Mapping[str, Any]) -> float:
    return float(x["score"]) if isinstance(x, Mapping) else float(x)


def _one_in(p: float) -> str:
    """0.25 -> "1 of 4": how often luck alone does this, in words."""
    if p < 0.0005:
        return "fewer than 1 of 2000"
    if p > 0.5:
        return f"{round(p * 10)} of 10"
    return f"1 of {max(2, round(1.0 / p))}"


def _floor_conditions(new: Mapping[str, Any], floors: Floors) -> list[Condition]:
    s_new = _score_of(new)
    trades = int(new["trades"])
    dd = float(new["max_drawdown_pct"])
    out = [
        Condition("min_trades", trades >= floors.min_trades, trades, floors.min_trades,
                  f"floor: {trades} trades {'>=' if trades >= floors.min_trades else '<'} min_trades "
                  f"{floors.min_trades}",
                  f"{trades} trades on the out-of-sample window; at least {floors.min_trades} are needed before a "
                  f"result means anything"),
        Condition("max_drawdown", dd <= floors.max_drawdown_pct, dd, floors.max_drawdown_pct,
                  f"floor: max drawdown {dd:.2f}% {'<=' if dd <= floors.max_drawdown_pct else '>'} "
                  f"{floors.max_drawdown_pct:.2f}%",
                  f"the worst fall from a peak was {dd:.1f}% of the account; the risk profile allows "
                  f"{floors.max_drawdown_pct:.0f}%"),
    ]
    if not math.isfinite(s_new):
        out.append(Condition("min_score", False, None, floors.min_score, "new score is not finite",
                             "the new set's score could not be computed"))
    elif floors.min_score is not None:
        ok = s_new > floors.min_score
        out.append(Condition(
            "min_score", ok, s_new, floors.min_score,
            f"floor: score {s_new:.4f} {'>' if ok else '<='} min_score {floors.min_score:g}"
            + ("" if ok else " (a set that loses money on the OOS window is never deployed)"),
            f"return per unit of drawdown {s_new:.2f} on the out-of-sample window; it must be above "
            f"{floors.min_score:g}" + (" (the set must make money)" if floors.min_score == 0 else "")))
    return out


def _seed_rule(s_new: float, baseline: float | Mapping[str, Any], improvement: float) -> tuple[Condition, float]:
    b = _score_of(baseline)
    thr = b * (1.0 + improvement) if b > 0 else b + improvement * abs(b)
    ok = math.isfinite(s_new) and s_new >= thr
    how = f"baseline {b:.4f} x {1 + improvement:.2f}" if b > 0 else f"baseline {b:.4f} + {improvement} x |{b:.4f}|"
    arith = f"score {s_new:.4f} {'>=' if ok else '<'} threshold {thr:.4f} = {how}"
    return Condition("improvement", ok, s_new, thr, arith,
                     f"the new set's score {s_new:.2f} against the deployed set's {b:.2f} on the same days; it "
                     f"must be at least {improvement:.0%} better"), thr


def _evidence_conditions(ev: Mapping[str, Any] | None, rules: GateRules, first_run: bool) -> list[Condition]:
    ev = ev or {}
    out: list[Condition] = []

    Texts = Callable[[float, str, Mapping[str, Any]], tuple[str, str]]

    def judged(name: str, what: str, thr: float, at_least: bool, texts: Texts) -> Condition:
        """The condition ``value >= thr`` (``at_least``) or ``value <= thr`` on the number ``name`` of evidence
        ``what``, worded by ``texts(value, comparison sign, evidence) -> (short, long)``; a failed condition that
        says why when the evidence was not computed (missing evidence never lets a set through)."""
        got = ev.get(what) or {}
        if got.get("ok") and got.get(name) is not None:
            v = float(got[name])
            ok = v >= thr if at_least else v <= thr
            short, long = texts(v, (">=" if ok else "<") if at_least else ("<=" if ok else ">"), got)
            return Condition(name, ok, v, thr, short, long)
        why = got.get("reason") or f"no {what} evidence was computed"
        return Condition(name, False, None, thr, f"{name}: not computable ({why})",
                         f"cannot be judged: {why}; without it the set is not deployed")

    def prob_better(p: float, sign: str, pb: Mapping[str, Any]) -> tuple[str, str]:
        return (f"P(new beats deployed) {p:.3f} {sign} {rules.min_prob_better:.2f}",
                f"resampling the {pb.get('n_days')} out-of-sample days in blocks, the new set made more per day "
                f"than the deployed one in {p:.0%} of {pb.get('resamples')} replays; "
                f"{rules.min_prob_better:.0%} are needed")

    def dsr(d: float, sign: str, ds: Mapping[str, Any]) -> tuple[str, str]:
        return (f"deflated Sharpe {d:.3f} {sign} {rules.min_dsr:.2f} (N={ds.get('n_trials')})",
                f"the run tried {ds.get('n_trials')} configurations; the best of that many pure-luck tries would "
                f"reach an annual Sharpe of about {float(ds.get('sr0_annual', 0.0)):.2f}, the new set has "
                f"{float(ds.get('sharpe_annual', 0.0)):.2f}: a result this good would come from pure luck in "
                f"{_one_in(1.0 - d)} searches of this size (confidence {d:.0%}, {rules.min_dsr:.0%} needed)")

    def pbo(v: float, sign: str, pb: Mapping[str, Any]) -> tuple[str, str]:
        loss = pb.get("prob_oos_loss")
        return (f"PBO {v:.3f} {sign} {rules.max_pbo:.2f} ({pb.get('n_splits')} CSCV splits)",
                f"when the sweep picks its best setting on half of its days, that setting lands in the worse half "
                f"on the other half in {v:.0%} of the {pb.get('n_splits')} ways to split them (at most "
                f"{rules.max_pbo:.0%} allowed)" + (f"; it lost money there in {float(loss):.0%}" if loss is not None
                                                   else ""))

    if not first_run:
        out.append(judged("prob_better", "paired_full", rules.min_prob_better, True, prob_better))
    out.append(judged("dsr", "dsr", rules.min_dsr, True, dsr))
    out.append(judged("pbo", "pbo", rules.max_pbo, False, pbo))
    if rules.holdout_not_worse:
        ho = ev.get("holdout") or {}
        new_h = ho.get("new")
        base_h = ho.get("baseline")
        if not new_h or new_h.get("score") is None:
            out.append(Condition("holdout", False, None, None, "holdout: no result for the new set",
                                 "the new set has no result on the holdout (the days the sweep never saw)"))
        elif first_run or not base_h or base_h.get("score") is None:
            v = float(new_h["score"])
            ok = v >= 0.0
            out.append(Condition(
                "holdout", ok, v, 0.0, f"holdout score {v:.4f} {'>=' if ok else '<'} 0 (first run)",
                f"on the last days the sweep never saw, the new set returned {float(new_h.get('return_pct', 0)):.2f}%"
                f" (score {v:.2f}); it must not lose money there"))
        else:
            v, b = float(new_h["score"]), float(base_h["score"])
            ok = v >= b
            out.append(Condition(
                "holdout", ok, v, b, f"holdout score {v:.4f} {'>=' if ok else '<'} deployed {b:.4f}",
                f"on the last days the sweep never saw, the new set returned {float(new_h.get('return_pct', 0)):.2f}%"
                f" (score {v:.2f}) against the deployed set's {float(base_h.get('return_pct', 0)):.2f}% "
                f"(score {b:.2f}); it must not be worse"))
    return out


def gate(new: Mapping[str, Any], baseline: float | Mapping[str, Any] | None, floors: Floors,
         improvement: float = 0.02, *, rules: GateRules | None = None,
         evidence: Mapping[str, Any] | None = None) -> GateDecision:
    """Decide whether the new run may replace the baseline (rules in the module docstring).

    ``new`` is the new run's metrics (needs ``score``, ``trades``, ``max_drawdown_pct``); ``baseline`` the deployed
    run's score (or its metrics), or None on the first run. ``rules`` None = the seed's gate with ``improvement``.
    Every condition is evaluated (none short-circuits) so that the reason names *every* failed one; a piece of
    evidence that could not be computed is a failed condition, never a silent pass."""
    rules = rules or GateRules.seed(improvement)
    s_new = _score_of(new)
    conds = _floor_conditions(new, floors)
    thr = None
    if baseline is not None:
        c, thr = _seed_rule(s_new, baseline, rules.improvement)
        conds.append(c)
    if rules.mode != "seed":
        conds.extend(_evidence_conditions(evidence, rules, first_run=baseline is None))
    failed = [c for c in conds if not c.passed]
    if failed:
        reason = "; ".join(c.rule for c in failed)
    elif baseline is None:
        extra = "" if rules.mode == "seed" else ", holdout, deflated Sharpe and PBO"
        reason = f"first run: floors{extra} met (score {s_new:.4f})"
    else:
        reason = f"score {s_new:.4f} >= threshold {thr:.4f} (baseline {_score_of(baseline):.4f})"
        if rules.mode != "seed":
            reason += "; " + "; ".join(c.rule for c in conds if c.name in ("prob_better", "dsr", "pbo", "holdout"))
    return GateDecision(not failed, reason, thr, tuple(conds), rules.mode)
