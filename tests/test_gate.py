"""Gate arithmetic: every condition can fail alone and the reason names it; a first run skips the paired
conditions; evidence that could not be computed is a failure with its reason; the seed mode is the seed's gate."""

from __future__ import annotations

from typing import Any

import pytest

from backtest.metrics import Floors, GateRules, gate
from core.config import default_config, parse_config

FLOORS = Floors(min_trades=30, max_drawdown_pct=20.0, min_score=0.0)
RULES = GateRules()  # the defaults: P(better) 0.90, DSR 0.50, PBO 0.50, holdout not worse


def _m(score: float, trades: int = 50, dd: float = 5.0, ret: float = 3.0) -> dict[str, Any]:
    return {"score": score, "trades": trades, "max_drawdown_pct": dd, "return_pct": ret}


def _evidence(**over: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "paired_full": {"ok": True, "reason": None, "prob_better": 0.97, "n_days": 84, "resamples": 5000},
        "dsr": {"ok": True, "reason": None, "dsr": 0.95, "n_trials": 1014, "sr0_annual": 3.1, "sharpe_annual": 4.2},
        "pbo": {"ok": True, "reason": None, "pbo": 0.2, "n_splits": 12870, "prob_oos_loss": 0.1},
        "holdout": {"new": _m(1.5), "baseline": _m(1.0)},
    }
    ev.update(over)
    return ev


def test_all_conditions_pass() -> None:
    d = gate(_m(2.0), _m(1.0), FLOORS, rules=RULES, evidence=_evidence())
    assert d.passed and d.failed == [] and d.mode == "default"
    assert [c.name for c in d.conditions] == ["min_trades", "max_drawdown", "min_score", "improvement",
                                              "prob_better", "dsr", "pbo", "holdout"]
    assert "P(new beats deployed) 0.970 >= 0.90" in d.reason  # a pass also says what it rests on


@pytest.mark.parametrize("name,new,evidence", [
    ("min_trades", _m(2.0, trades=29), _evidence()),
    ("max_drawdown", _m(2.0, dd=20.5), _evidence()),
    ("improvement", _m(1.01), _evidence()),
    ("prob_better", _m(2.0), _evidence(paired_full={"ok": True, "prob_better": 0.89, "n_days": 84,
                                                    "resamples": 5000})),
    ("dsr", _m(2.0), _evidence(dsr={"ok": True, "dsr": 0.499, "n_trials": 1014, "sr0_annual": 3.1,
                                    "sharpe_annual": 2.9})),
    ("pbo", _m(2.0), _evidence(pbo={"ok": True, "pbo": 0.51, "n_splits": 12870, "prob_oos_loss": 0.4})),
    ("holdout", _m(2.0), _evidence(holdout={"new": _m(0.99), "baseline": _m(1.0)})),
])
def test_each_condition_fails_alone_and_is_named(name: str, new: dict[str, Any], evidence: dict[str, Any]) -> None:
    d = gate(new, _m(1.0), FLOORS, rules=RULES, evidence=evidence)
    assert not d.passed and d.failed == [name]
    failed = next(c for c in d.conditions if c.name == name)
    assert failed.rule in d.reason and d.reason.count(";") == 0  # only that one is named
    assert failed.meaning  # and explained in words


def test_min_score_fails_alone_on_a_first_run() -> None:
    d = gate(_m(-0.1, ret=-0.5), None, FLOORS, rules=RULES,
             evidence=_evidence(holdout={"new": _m(0.5), "baseline": None}))
    assert d.failed == ["min_score"] and "min_score" in d.reason


def test_every_failed_condition_is_named() -> None:
    ev = _evidence(paired_full={"ok": True, "prob_better": 0.5, "n_days": 84, "resamples": 5000},
                   pbo={"ok": True, "pbo": 0.9, "n_splits": 70, "prob_oos_loss": 0.7})
    d = gate(_m(0.5, trades=3), _m(1.0), FLOORS, rules=RULES, evidence=ev)
    assert d.failed == ["min_trades", "improvement", "prob_better", "pbo"]
    for word in ("min_trades", "threshold", "P(new beats deployed)", "PBO"):
        assert word in d.reason


def test_first_run_uses_holdout_dsr_pbo_without_the_paired_ones() -> None:
    ev = _evidence(paired_full={"ok": False, "reason": "first run: no deployed set to compare with"},
                   holdout={"new": _m(0.3), "baseline": None})
    d = gate(_m(2.0), None, FLOORS, rules=RULES, evidence=ev)
    assert d.passed and [c.name for c in d.conditions] == ["min_trades", "max_drawdown", "min_score", "dsr", "pbo",
                                                             "holdout"]
    assert "first run" in d.reason
    losing = gate(_m(2.0), None, FLOORS, rules=RULES, evidence=_evidence(holdout={"new": _m(-0.2), "baseline": None}))
    assert losing.failed == ["holdout"] and "(first run)" in losing.reason


def test_evidence_that_could_not_be_computed_fails_with_its_reason() -> None:
    ev = _evidence(dsr={"ok": False, "reason": "not enough days: 12 days with a return (need 20)", "dsr": None},
                   pbo={"ok": False, "reason": "window too short for CSCV", "pbo": None})
    d = gate(_m(2.0), _m(1.0), FLOORS, rules=RULES, evidence=ev)
    assert d.failed == ["dsr", "pbo"] and "12 days" in d.reason and "too short" in d.reason
    nothing = gate(_m(2.0), _m(1.0), FLOORS, rules=RULES, evidence=None)
    assert nothing.failed == ["prob_better", "dsr", "pbo", "holdout"]


def test_seed_mode_is_the_seed_gate_and_ignores_evidence() -> None:
    bad = _evidence(paired_full={"ok": True, "prob_better": 0.1, "n_days": 84, "resamples": 5000})
    d = gate(_m(2.0), _m(1.0), FLOORS, rules=GateRules.seed(), evidence=bad)
    assert d.passed and d.mode == "seed" and d.failed == []
    assert gate(_m(2.0), _m(1.0), FLOORS).passed  # the old call: the seed gate


def test_rules_from_config_and_holdout_switch() -> None:
    raw = default_config().model_dump(mode="json")
    raw["pipeline"]["gate"].update({"mode": "seed", "min_dsr": 0.95, "holdout_not_worse": False})
    rules = GateRules.from_config(parse_config(raw).pipeline)
    assert rules.mode == "seed" and rules.min_dsr == 0.95 and rules.improvement == 0.02
    off = GateRules(holdout_not_worse=False)
    d = gate(_m(2.0), _m(1.0), FLOORS, rules=off, evidence=_evidence(holdout={"new": _m(-5.0), "baseline": _m(1.0)}))
    assert d.passed and "holdout" not in [c.name for c in d.conditions]
    with pytest.raises(Exception, match="pbo_blocks"):
        raw["pipeline"]["gate"]["pbo_blocks"] = 7  # S must be even
        parse_config(raw)


def test_decision_dict_is_what_the_report_shows() -> None:
    d = gate(_m(2.0), _m(1.0), FLOORS, rules=RULES, evidence=_evidence())
    out = d.to_dict()
    assert out["passed"] and out["mode"] == "default" and len(out["conditions"]) == 8
    dsr = next(c for c in out["conditions"] if c["name"] == "dsr")
    assert dsr["value"] == 0.95 and dsr["threshold"] == 0.5 and dsr["passed"]
    assert "pure luck in 1 of 20 searches of this size" in dsr["meaning"]
    assert "[ok]" in out["arithmetic"]


def test_why_this_decision_in_report_and_telegram() -> None:
    from ops.report import render_markdown, telegram_text

    ev = _evidence(pbo={"ok": True, "pbo": 0.75, "n_splits": 12870, "prob_oos_loss": 0.6, "blocks": 16,
                        "block_days": 3, "n_configs": 864},
                   direction={"ok": True, "long_vs_short": 0.501, "ci95": [0.47, 0.53], "n_decided": 3000,
                              "long_vs_rest": 0.56, "short_vs_rest": 0.55})
    d = gate(_m(2.0), _m(1.0), FLOORS, rules=RULES, evidence=ev)
    rep = {"run_id": "r1", "demo": False, "phases": [], "gate": d.to_dict(), "evidence": ev,
           "decision": {"action": "rollback", "reason": d.reason}}
    md = render_markdown(rep)
    assert "## Why this decision" in md and "| sweep not overfit (`pbo`) | 0.750 | 0.500 | **FAIL** |" in md
    assert "| better than luck (`dsr`) | 0.950 | 0.500 | pass |" in md
    assert "long-vs-short AUC 0.501 (95%: 0.470 .. 0.530)" in md and "no directional edge" in md
    tg = telegram_text(rep)
    assert "FAIL sweep not overfit" in tg and "PASS beats the deployed set" in tg and "in 75% of the 12870" in tg
    assert "Direction (not gated): long-vs-short AUC 0.501" in tg
