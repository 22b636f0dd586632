"""Test helper: tiny real LightGBM position, risk and SL/TP models on seeded synthetic data (not trading models).

Why shared: the manifest and the security tests both need a complete non-signal set to save, load and compare
predictions with; one definition keeps the two sets (and so what the two files prove) the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightgbm as lgb
import numpy as np

from backtest.policy import ACCOUNT_STATE_FEATURES, POSITION_STATE_FEATURES
from ml.models.position import PositionModel
from ml.models.risk import RiskModel
from ml.models.sltp import SltpModel


def toy_booster(X: np.ndarray, y: np.ndarray, objective: str) -> lgb.Booster:
    """10 rounds of 4 leaves, single-threaded and deterministic."""
    params = {"objective": objective, "num_leaves": 4, "min_data_in_leaf": 5, "verbose": -1, "seed": 1,
              "deterministic": True, "force_row_wise": True, "num_threads": 1}
    return lgb.train(params, lgb.Dataset(X, y), num_boost_round=10)


def toy_models(rng: np.random.Generator, names: Sequence[str], market: Sequence[str], *, risk_min: float,
               **position_kwargs: Any) -> tuple[PositionModel, np.ndarray, RiskModel, np.ndarray, SltpModel]:
    """(position model, its inputs, risk model, its inputs, SL/TP model on ``names``), drawn from ``rng`` in that
    order; ``position_kwargs`` go to :class:`PositionModel` (params, seed, info)."""
    Xp = rng.standard_normal((300, len(POSITION_STATE_FEATURES) + len(market)))
    pos = PositionModel(booster=toy_booster(Xp, (Xp[:, 0] > 0).astype(float), "binary"), market_features=list(market),
                        **position_kwargs)
    Xr = rng.standard_normal((300, len(ACCOUNT_STATE_FEATURES)))
    risk = RiskModel(booster=toy_booster(Xr, 1 + 0.1 * Xr[:, 0], "regression"), mult_min=risk_min, mult_max=1.5)
    Xs = rng.standard_normal((300, len(names)))
    sltp = SltpModel(sl_booster=toy_booster(Xs, 1.5 + 0.1 * Xs[:, 0], "regression"),
                     tp_booster=toy_booster(Xs, 2.0 + 0.1 * Xs[:, 1], "regression"), feature_names=list(names))
    return pos, Xp, risk, Xr, sltp
