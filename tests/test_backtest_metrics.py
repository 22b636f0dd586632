"""Metrics, the score (scale-free, positive only when profitable) and every branch of the gate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _candles import real_btc

from backtest.engine import prepare_arrays, run_arrays
from backtest.metrics import Floors, compute_metrics, gate, json_safe, score
from backtest.policy import make_params, replace_params
from backtest.rules import RuleSignal
from core.config import default_config
from market.features import build_features

FLOORS = Floors(min_trades=30, max_drawdown_pct=20.0)


def _m(score_: float, trades: int = 50, dd: float = 10.0) -> dict[str, float]:
    return {"score": score_, "trades": trades, "max_drawdown_pct": dd}


# ------------------------------------------------------------------------------------------------------ gate
def test_gate_positive_baseline_needs_two_percent_more() -> None:
    d = gate(_m(1.02), 1.0, FLOORS)
    assert d.passed and d.threshold == pytest.approx(1.02)
    d = gate(_m(1.019), 1.0, FLOORS)
    assert not d.passed and "threshold" in d.reason


def test_gate_non_positive_baseline_needs_two_percent_of_its_magnitude() -> None:
    d = gate(_m(-0.98), -1.0, FLOORS)
    assert d.passed and d.threshold == pytest.approx(-0.98)
    assert not gate(_m(-0.99), -1.0, FLOORS).passed
    d0 = gate(_m(0.0), 0.0, FLOORS)  # baseline 0 -> threshold 0
    assert d0.passed and d0.threshold == 0.0
    assert not gate(_m(-1e-9), 0.0, FLOORS).passed


def test_gate_first_run_checks_only_floors() -> None:
    d = gate(_m(-5.0), None, FLOORS)
    assert d.passed and d.threshold is None and "first run" in d.reason


@pytest.mark.parametrize("baseline", [None, 1.0, -1.0])
def test_gate_floors_apply_always(baseline: float | None) -> None:
    few = gate(_m(10.0, trades=29), baseline, FLOORS)
    assert not few.passed and "min_trades" in few.reason
    deep = gate(_m(10.0, dd=20.5), baseline, FLOORS)
    assert not deep.passed and "drawdown" in deep.reason
    assert gate(_m(10.0, trades=30, dd=20.0), baseline, FLOORS).passed  # floors are inclusive


def test_gate_accepts_metrics_as_baseline_and_profile_floors() -> None:
    floors = Floors.from_profile(default_config().profile)
    assert floors == Floors(min_trades=30, max_drawdown_pct=20.0, min_score=0.0)
    assert gate(_m(2.0), _m(1.0), floors).passed
    assert not gate(_m(float("nan")), 1.0, floors).passed


# ------------------------------------------------------------------------------------------------------ score
def test_score_positive_only_when_profitable_and_trade_factor() -> None:
    assert score({"return_pct": 10.0, "max_drawdown_pct": 5.0, "trades": 30}, 30) == pytest.approx(2.0)
    assert score({"return_pct": 10.0, "max_drawdown_pct": 5.0, "trades": 15}, 30) == pytest.approx(1.0)
    assert score({"return_pct": 10.0, "max_drawdown_pct": 0.1, "trades": 30}, 30) == pytest.approx(10.0)  # dd floor
    assert score({"return_pct": -10.0, "max_drawdown_pct": 12.0, "trades": 3}, 30) < 0  # no shrink for losses
    assert score({"return_pct": -10.0, "max_drawdown_pct": 12.0, "trades": 3}, 30) == pytest.approx(-10 / 12)
    assert score({"return_pct": 0.0, "max_drawdown_pct": 0.0, "trades": 0}, 30) == 0.0


def _curve_metrics(equity: np.ndarray, initial: float, pnl: np.ndarray) -> dict[str, float]:
    day = np.repeat(np.arange(len(equity) // 96 + 1), 96)[: len(equity)]
    entry = np.arange(pnl.size) * 2
    return compute_metrics(equity, day, pnl, pnl / 10.0, entry, entry + 1, initial, 0, 30)


def test_metrics_and_score_are_scale_free_on_a_curve() -> None:
    rng = np.random.default_rng(0)
    eq = 10_000 * np.cumprod(1 + rng.normal(2e-4, 3e-3, 2000))
    pnl = rng.normal(5, 20, 60)
    a = _curve_metrics(eq, 10_000.0, pnl)
    b = _curve_metrics(eq * 2, 20_000.0, pnl * 2)
    for k in ("return_pct", "max_drawdown_pct", "sharpe", "sortino", "profit_factor", "win_rate", "score"):
        assert a[k] == pytest.approx(b[k], rel=1e-12), k
    assert b["net_profit"] == pytest.approx(2 * a["net_profit"])


def test_score_scale_free_through_a_real_backtest() -> None:
    cfg = default_config()
    candles = real_btc(12_000)
    feats = build_features(candles, cfg)
    A = prepare_arrays(candles, feats, RuleSignal(list(feats.columns), gain=-1.0), cfg)
    # fine lots so that rounding to the volume step does not differ between the two account sizes
    p = replace_params(make_params(cfg), volume_step=1e-8, volume_min=1e-8, volume_max=1e9,
                       max_drawdown_halt_pct=100.0, confidence_threshold=0.6)
    one = run_arrays(A, p, 1000).metrics(A, 30)
    two = run_arrays(A, replace_params(p, initial_equity=2 * p.initial_equity), 1000).metrics(A, 30)
    assert one["trades"] == two["trades"] > 30
    assert two["score"] == pytest.approx(one["score"], rel=1e-6)
    assert (one["score"] > 0) == (one["return_pct"] > 0)


def test_metrics_values() -> None:
    # two days: +10 % then -5 %; trades +100, -50, -50 (one losing streak of 2)
    eq = np.array([1000.0, 1100.0, 1100.0, 1045.0])
    day = np.array([0, 0, 1, 1])
    pnl = np.array([100.0, -50.0, -5.0])
    m = compute_metrics(eq, day, pnl, np.array([1.0, -0.5, -0.05]), np.array([0, 1, 2]), np.array([1, 2, 3]),
                        1000.0, 2, 30)
    assert m["net_profit"] == pytest.approx(45.0) and m["return_pct"] == pytest.approx(4.5)
    assert m["max_drawdown_pct"] == pytest.approx(5.0)
    assert m["profit_factor"] == pytest.approx(100 / 55) and m["win_rate"] == pytest.approx(1 / 3)
    assert m["longest_losing_streak"] == 2 and m["breaker_trips"] == 2 and m["trades"] == 3
    r = np.array([0.1, -0.05])
    assert m["sharpe"] == pytest.approx(r.mean() / r.std(ddof=1) * math.sqrt(365))
    assert m["sortino"] == pytest.approx(r.mean() / math.sqrt(np.mean(np.minimum(r, 0) ** 2)) * math.sqrt(365))
    assert m["exposure_pct"] == pytest.approx(6 / 4 * 100)
    none = compute_metrics(np.full(5, 1000.0), np.zeros(5, int), np.zeros(0), np.zeros(0), np.zeros(0, int),
                           np.zeros(0, int), 1000.0, 0, 30)
    assert none["trades"] == 0 and none["score"] == 0.0 and none["profit_factor"] == 0.0
    wins_only = compute_metrics(eq, day, np.array([5.0]), np.array([1.0]), np.array([0]), np.array([1]), 1000.0, 0,
                                30)
    assert wins_only["profit_factor"] == math.inf and json_safe(wins_only)["profit_factor"] is None


def test_gate_min_score_floor_blocks_losing_sets_even_on_first_run() -> None:
    floors = Floors(min_trades=30, max_drawdown_pct=20.0, min_score=0.0)
    losing = gate(_m(-0.5), None, floors)
    assert not losing.passed and "min_score" in losing.reason
    flat = gate(_m(0.0), None, floors)
    assert not flat.passed  # strictly above the floor
    assert gate(_m(0.01), None, floors).passed
    # a losing baseline does not let a still-losing new set through
    assert not gate(_m(-0.1), _m(-1.0), floors).passed
    assert gate(_m(-0.1), _m(-1.0), Floors(30, 20.0)).passed  # without the floor: the 2% rule alone


def test_the_kernel_measures_the_drawdown_of_the_curve_it_marks() -> None:
    """The fast kernel's max drawdown (measured while it marks the equity, flat stretches once) is the one the
    metrics compute from the whole curve, bit for bit: fresh runs, a run continued from a saved state in the middle
    of a position, and a run left open at its end."""
    from _candles import real_btc

    from backtest.engine import prepare_arrays, run_arrays
    from backtest.metrics import _curve_stats
    from backtest.policy import make_params, replace_params
    from backtest.rules import RuleSignal, toy_exit_model, toy_risk_model
    from backtest.stats import day_ends
    from core.config import default_config
    from market.features import build_features

    cfg = default_config()
    candles = real_btc(6000)
    feats = build_features(candles, cfg)
    A = prepare_arrays(candles, feats, RuleSignal(list(feats.columns), sltp_rule=True,
                                                  exit_model=toy_exit_model(feats, seed=5),
                                                  risk_model=toy_risk_model(seed=6)), cfg)
    none = np.zeros(0)

    def curve_dd(run) -> float:  # noqa: ANN001
        eq = run.equity
        return _curve_stats(eq, day_ends(A.day[run.start:run.end]), run.params.initial_equity, -1.0, none,
                            none.astype(np.int64), none.astype(np.int64))[0] / 100.0

    runs = []
    for conf, risk in ((0.5, 1.0), (0.6, 3.0), (0.45, 0.5)):
        p = replace_params(make_params(cfg), confidence_threshold=conf, risk_percent=risk)
        runs.append(run_arrays(A, p, 800, 6000))
    first = run_arrays(A, p, 800, 3500, close_at_end=False)
    runs += [first, run_arrays(A, p, 3500, 6000, state=first.final_state)]
    assert all(r.n_trades > 10 for r in runs) and len({r.max_drawdown for r in runs}) >= 4
    assert first.final_state is not None
    for r in runs:
        assert r.max_drawdown == curve_dd(r) > 0.0
        assert r.metrics(A)["max_drawdown_pct"] == r.max_drawdown * 100.0
