"""Test helper: a whole search-and-gate week on given candles, with rule-based signals instead of trained models.

Why: the weekly job's statistics must be judged where the answer is known (pure noise: nothing to find; a planted
edge: something to find), over several seeds, in seconds. Training models would cost a minute per week; the gate
does not care where the signal came from, only how hard the run searched. So a "week" here is the job's phases
11-13 on real backtests:

* champion = the rule-based momentum signal (horizon 16) with the config's trading values;
* the "Optuna study" = 8 rule variants (horizon 1/4/16/64, momentum or mean reversion), the best chosen on the four
  weeks *before* the OOS window (the study never sees OOS either);
* the sweep = the real profile grid (``backtest.sweep.run_sweep``) on the first 70% of the OOS window;
* evidence = ``backtest.stats.gate_evidence`` on the same daily returns the job uses; both gates decide.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from backtest.engine import prepare_arrays, run_arrays
from backtest.metrics import Floors, GateRules, gate
from backtest.policy import make_params
from backtest.stats import gate_evidence, result_daily_returns
from backtest.sweep import run_sweep
from core.config import Config, default_config, parse_config
from market.features import build_features
from market.labels import triple_barrier
from market.splits import oos_start_position

VARIANTS = [(h, g) for h in (1, 4, 16, 64) for g in (1.0, -1.0)]


def zero_cost_config(oos_weeks: int = 12) -> Config:
    """The shipped defaults with trading costs set to zero, so that costs cannot make noise lose."""
    raw = default_config().model_dump(mode="json")
    raw["costs"].update({"commission_per_lot": 0.0, "slippage_points": 0.0, "default_spread_points": 0.0})
    raw["splits"]["oos_weeks"] = oos_weeks
    return parse_config(raw)


def week(candles: pd.DataFrame, cfg: Config, *, resamples: int = 2000, seed: int = 0,
         champion: tuple[int, float] | None = (16, 1.0)) -> dict[str, Any]:
    """One search-and-gate week (module docstring): the evidence and both gates' decisions.

    ``champion`` = (horizon, gain) of the deployed rule, or None for a first run (nothing deployed)."""
    from backtest.rules import RuleSignal

    feats = build_features(candles, cfg)
    names = list(feats.columns)
    n = len(candles)
    o = oos_start_position(candles.index, cfg.splits.oos_weeks)
    sw_end = o + int(np.floor((n - o) * cfg.splits.sweep_fraction))
    pre = (max(800, o - 4 * 7 * 96), o)
    windows = {"full": (o, n), "holdout": (sw_end, n)}
    base_params = make_params(cfg)
    mt = cfg.profile.min_trades

    def runs(arrays: Any, params: Any) -> dict[str, Any]:
        return {k: run_arrays(arrays, params, s, e).to_result(arrays, min_trades=mt, in_sample=False)
                for k, (s, e) in windows.items()}

    champ = None
    if champion is not None:
        champ = runs(prepare_arrays(candles, feats, RuleSignal(names, horizon=champion[0], gain=champion[1]), cfg),
                     base_params)
    best, best_score = None, -np.inf
    for h, g in VARIANTS:  # the "study": chosen before the OOS window
        a = prepare_arrays(candles, feats, RuleSignal(names, horizon=h, gain=g), cfg)
        sc = run_arrays(a, base_params, *pre).metrics(a, mt)["score"]
        if sc > best_score:
            best, best_score = a, sc
    assert best is not None
    res = run_sweep(best, cfg, (o, sw_end), oos_bars=n - o, n_jobs=1)
    raw = cfg.model_dump(mode="json")
    if res.best:
        raw["trading"].update(res.best)
    cand = parse_config(raw)
    new = runs(best, make_params(cand))
    labels = triple_barrier(candles, feats["atr"].to_numpy(), cfg)
    daily = lambda rr: {k: result_daily_returns(r.equity, r.params.initial_equity) for k, r in rr.items()}  # noqa: E731
    ev = gate_evidence(daily(new), daily(champ) if champ else None, res.daily, len(VARIANTS),
                       {"new": new["holdout"].metrics, "baseline": champ["holdout"].metrics if champ else None},
                       (best.p_long[o:n], best.p_short[o:n], labels["label"].to_numpy()[o:n],
                        labels["valid"].to_numpy()[o:n]),
                       resamples=resamples, seed=seed, direction_resamples=200)
    floors = Floors.from_profile(cfg.profile)
    base = champ["full"].metrics if champ else None
    out = {"evidence": ev, "new": new["full"].metrics, "baseline": base}
    for mode, rules in (("seed", GateRules.seed(cfg.pipeline.gate_improvement)),
                        ("default", GateRules.from_config(cfg.pipeline))):
        out[mode] = gate(new["full"].metrics, base, floors, rules=rules, evidence=ev)
    return out
