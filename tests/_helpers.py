"""Test helpers shared by several test files: one definition of a setup that more than one proof relies on."""

from __future__ import annotations

from typing import Any

import pandas as pd
from _candles import real_btc

from backtest.policy import Params, make_params, replace_params
from backtest.rules import RuleSignal, toy_exit_model, toy_risk_model
from core.config import Config, default_config
from market.features import build_features


def rule_models_on_real_btc(n: int) -> tuple[Config, pd.DataFrame, pd.DataFrame, RuleSignal]:
    """The default config, the first ``n`` real BTC bars, their features and a rule signal with SL/TP and a position
    (exit) and a risk model as real trees (fixed seeds): the richest policy the backtester runs, without training."""
    cfg = default_config()
    candles = real_btc(n)
    feats = build_features(candles, cfg)
    pred = RuleSignal(list(feats.columns), sltp_rule=True, exit_model=toy_exit_model(feats, seed=11),
                      risk_model=toy_risk_model(seed=12))
    return cfg, candles, feats, pred


def tripping_params(cfg: Config, max_drawdown_halt_pct: float) -> Params:
    """Params whose breakers trip on real BTC (1 % daily loss, 3 losses in a row, then 8 bars' cooldown) plus the
    given drawdown halt: the state a cut in the middle of a run must carry."""
    return replace_params(make_params(cfg), risk_percent=1.0, confidence_threshold=0.6, daily_loss_limit_pct=1.0,
                          max_consecutive_losses=3, cooldown_bars=8, max_drawdown_halt_pct=max_drawdown_halt_pct)


def short_demo_raw(demo_bars: int, oos_weeks: int, confidence_threshold: float) -> dict[str, Any]:
    """The default config as a raw dict, cut down to a short demo run (``demo_bars`` of history, 2+2 trials) with a
    lower confidence threshold so that a few months still produce trades: the base of the end-to-end tests."""
    raw = default_config().model_dump(mode="json")
    raw["data"]["demo_bars"] = demo_bars
    raw["data"]["history_days"] = 400
    raw["splits"]["oos_weeks"] = oos_weeks
    raw["tuning"]["signal_trials"] = 2
    raw["tuning"]["position_trials"] = 2
    raw["trading"]["confidence_threshold"] = confidence_threshold
    return raw
