"""The interface between the models and the trading logic (the engine imports nothing from ``ml.models``).

Why a protocol: training needs the backtest (tuning objectives, risk labels) and the backtest needs predictions. The
engine, the kernel and the live Trader only see this small surface; ``ml.models.bundle.ModelBundle`` implements it
for the trained models, :class:`backtest.rules.RuleSignal` implements it with a rule-based signal until models exist.

* ``feature_names``: the columns (in order) of the feature matrix the predictor expects; the engine selects exactly
  these columns of ``market.features.build_features`` output before any call.
* ``signal_proba(X)``: ``X`` float32 ``[n, len(feature_names)]`` -> float64 ``[n, 2]`` = (p_long, p_short), the
  calibrated ensemble's probabilities that a long / short trade started at that bar's close wins. State-independent:
  the fast mode calls it once on all bars, the step mode / live bot on one row per bar; both must give the same
  numbers for the same row (row-wise models do).
* ``sltp(X)``: ``[n, 2]`` = (sl_atr, tp_atr) stop and target distances in ATR units per bar, or ``None`` (then the
  config's fixed multiples are used). State-independent, same calling convention.
* ``exit_model``: ``(CompiledTrees, market_cols)`` or ``None``. The position model's input row is
  ``backtest.policy.POSITION_STATE_FEATURES`` followed by the feature columns ``market_cols`` (int indices into
  ``feature_names``); its output is an exit probability (binary objective). State-dependent, so it is evaluated
  as compiled trees inside the kernel and by the Trader with the same ``backtest.trees.predict``.
* ``risk_model``: ``CompiledTrees`` or ``None``: input ``backtest.policy.ACCOUNT_STATE_FEATURES``, output the risk
  multiplier (clamped to the config's band).
* optional ``name``: a short description for reports (e.g. "rule-based momentum (not a model)").
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from backtest.trees import CompiledTrees


@runtime_checkable
class Predictor(Protocol):
    """What the engine and the live Trader need from the models (see the module docstring)."""

    @property
    def feature_names(self) -> list[str]: ...

    def signal_proba(self, X: np.ndarray) -> np.ndarray: ...

    def sltp(self, X: np.ndarray) -> np.ndarray | None: ...

    @property
    def exit_model(self) -> tuple[CompiledTrees, np.ndarray] | None: ...

    @property
    def risk_model(self) -> CompiledTrees | None: ...


class CompiledModels:
    """The two state-dependent parts of a :class:`Predictor`, held as compiled trees and handed to the kernel as they
    are (``_exit_model``, ``_risk_model``; None = not used). Why a base class: every predictor passes them through the
    same way, whatever computes its signal (rules or trained models)."""

    _exit_model: tuple[CompiledTrees, np.ndarray] | None = None
    _risk_model: CompiledTrees | None = None

    @property
    def exit_model(self) -> tuple[CompiledTrees, np.ndarray] | None:
        """(CompiledTrees, int64 indices of the position model's market features in ``feature_names``) or None."""
        return self._exit_model

    @property
    def risk_model(self) -> CompiledTrees | None:
        """CompiledTrees of the risk model, or None."""
        return self._risk_model


def predictor_name(predictor: object) -> str:
    """The predictor's description for reports."""
    return str(getattr(predictor, "name", type(predictor).__name__))
