"""The trained models as one :class:`backtest.predictor.Predictor`: what the backtester, the sweep and the bot use.

Why a bundle: the engine must not import ``ml.models`` (one import direction), so it takes this small object. It
loads a model folder (``models/`` or a staging folder) as one unit: the manifest is read and *every* present file's
sha256 is checked before anything is unpickled, the signal and SL/TP models must have been trained on exactly the
caller's feature list (names and order), and the state-dependent models (position, risk) are compiled to arrays with
:func:`backtest.trees.compile_booster` so that the compiled kernel and the live Trader evaluate them identically.

Optional models: only the signal ensemble is required. Without ``sl_tp.joblib`` the config's fixed multiples are
used, without ``position.joblib`` / ``risk.joblib`` the engine runs without the exit / risk model (the Predictor
returns ``None`` for them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml.models.manifest import FILES, SIGNAL_KEYS, ModelError, load_model, read_manifest, require, verify
from ml.models.signal import SIGNAL_MODELS, ensemble_proba, p_long_short

_FEATURE_CHECKED = (*SIGNAL_KEYS, "sl_tp")  # models fed the full feature matrix X


@dataclass
class ModelBundle:
    """Loaded, verified models of one folder. Implements the backtester's Predictor protocol."""

    folder: Path
    _feature_names: list[str]
    signal_models: dict[str, Any]
    sltp_model: Any | None = None
    _exit_model: tuple[Any, np.ndarray] | None = None
    _risk_model: Any | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, float] | None = None
    name: str = "signal ensemble (RF+XGB+LGB, calibrated)"

    # ------------------------------------------------------------------------------------ Predictor protocol
    @property
    def feature_names(self) -> list[str]:
        return list(self._feature_names)

    def _check_X(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != len(self._feature_names):
            raise ModelError(f"the models take {len(self._feature_names)} feature columns, got an array of shape "
                             f"{X.shape}")
        return X

    def signal_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, 2) float64 ``[p_long, p_short]`` from the calibrated ensemble (row-wise: same numbers for a row
        whether it comes alone or in a batch)."""
        return p_long_short(ensemble_proba(self.signal_models, self._check_X(X), self.weights))

    def sltp(self, X: np.ndarray) -> np.ndarray | None:
        """(n, 2) ``[sl_atr, tp_atr]`` from ``sl_tp.joblib``, or None when there is no SL/TP model."""
        if self.sltp_model is None:
            return None
        out = np.asarray(self.sltp_model.predict(self._check_X(X)), dtype=np.float64)
        if out.ndim != 2 or out.shape[1] != 2:
            raise ModelError(f"sl_tp model returned shape {out.shape}, expected (n, 2)")
        return out

    @property
    def exit_model(self) -> tuple[Any, np.ndarray] | None:
        """(CompiledTrees, int64 indices of the position model's market features in ``feature_names``) or None."""
        return self._exit_model

    @property
    def risk_model(self) -> Any | None:
        """CompiledTrees of the risk model, or None."""
        return self._risk_model

    # ------------------------------------------------------------------------------------ reports
    def describe(self) -> dict[str, Any]:
        """Per model file: sha256, size, created-at, code version, kind and validation metrics (for run reports)."""
        out: dict[str, Any] = {"folder": str(self.folder), "models": {}}
        for key, e in self.manifest.get("models", {}).items():
            out["models"][key] = {
                "file": e.get("file"), "sha256": e.get("sha256"), "size": e.get("size"),
                "created_at": e.get("created_at"), "code_version": e.get("code_version"), "kind": e.get("kind"),
                "train_range": e.get("train_range"), "data_hash": e.get("data_hash"), "metrics": e.get("metrics"),
            }
        out["loaded"] = {
            "signal": sorted(self.signal_models), "sl_tp": self.sltp_model is not None,
            "position": self._exit_model is not None, "risk": self._risk_model is not None,
        }
        return out


def _market_cols(obj: Any, feature_names: Sequence[str]) -> np.ndarray:
    wanted = list(getattr(obj, "market_features", []) or [])
    missing = [f for f in wanted if f not in feature_names]
    if missing:
        raise ModelError(f"feature mismatch for position: its market features {missing[:5]} are not among the "
                         f"supplied features; retrain the position model")
    return np.array([list(feature_names).index(f) for f in wanted], dtype=np.int64)


def load_bundle(models_dir: str | os.PathLike[str], feature_names: Sequence[str],
                weights: dict[str, float] | None = None) -> ModelBundle:
    """Verify and load the model set in ``models_dir`` for the features ``feature_names`` (in this order).

    Every file listed in the manifest is hash-checked first (one bad file stops the load before any unpickling);
    the three signal models are required (:class:`ModelError` names the missing one and the script to run).
    """
    from backtest.trees import compile_booster

    folder = Path(models_dir)
    names = list(feature_names)
    require(folder, SIGNAL_KEYS, "the backtest / live predictor")
    manifest = read_manifest(folder)
    present = [k for k in FILES if k in manifest["models"]]
    verify(folder, present)  # hashes of everything, before any unpickling
    verify(folder, [k for k in present if k in _FEATURE_CHECKED], feature_names=names)

    signal = {m: load_model(folder, f"signal_{m}", names) for m in SIGNAL_MODELS}
    sltp = load_model(folder, "sl_tp", names) if "sl_tp" in present else None
    exit_model = None
    if "position" in present:
        pos = load_model(folder, "position", None)
        exit_model = (compile_booster(pos.booster), _market_cols(pos, names))
    risk = compile_booster(load_model(folder, "risk", None).booster) if "risk" in present else None
    return ModelBundle(folder=folder, _feature_names=names, signal_models=signal, sltp_model=sltp,
                       _exit_model=exit_model, _risk_model=risk, manifest=manifest, weights=weights)
