"""The trained models as one :class:`backtest.predictor.Predictor`: what the backtester, the sweep and the bot use.

Why a bundle: the engine must not import ``ml.models`` (one import direction), so it takes this small object. It
loads a model folder (``models/`` or a staging folder) as one unit: the manifest's signature and *every* present
file's sha256 are checked before anything is decoded (no file is a pickle: :mod:`ml.models.archive`), the signal
and SL/TP models must have been trained on exactly the caller's feature list (names and order), and the
state-dependent models (position, risk) are compiled to arrays with :func:`backtest.trees.compile_booster` so that
the compiled kernel and the live Trader evaluate them identically.

:func:`load_deployed` reads ``config.json`` and ``models/`` as one consistent pair (readers: ``backtest/run.py``, the
live bot).

Optional models: only the signal ensemble is required. Without ``sl_tp.zip`` the config's fixed multiples are
used, without ``position.zip`` / ``risk.zip`` the engine runs without the exit / risk model (the Predictor
returns ``None`` for them).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backtest.predictor import CompiledModels
from ml.models.manifest import (
    FILES,
    MANIFEST,
    SIGNAL_KEYS,
    ModelError,
    _show,
    _verified_bytes,
    decode_verified,
    read_verified_manifest,
    require,
    signing_key,
)
from ml.models.signal import SIGNAL_MODELS, ensemble_proba, p_long_short

_FEATURE_CHECKED = (*SIGNAL_KEYS, "sl_tp")  # models fed the full feature matrix X


@dataclass
class ModelBundle(CompiledModels):
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
        """(n, 2) ``[sl_atr, tp_atr]`` from ``sl_tp.zip``, or None when there is no SL/TP model."""
        if self.sltp_model is None:
            return None
        out = np.asarray(self.sltp_model.predict(self._check_X(X)), dtype=np.float64)
        if out.ndim != 2 or out.shape[1] != 2:
            raise ModelError(f"sl_tp model returned shape {out.shape}, expected (n, 2)")
        return out

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
                weights: dict[str, float] | None = None, *, signing: bytes | None = None) -> ModelBundle:
    """Verify and load the model set in ``models_dir`` for the features ``feature_names`` (in this order).

    Order (see :mod:`ml.models.manifest`): the manifest's signature (``signing`` defaults to the folder's root key),
    then every listed file's sha256 and the feature lists, all before a single byte is decoded; then each file is
    decoded from the very bytes that were hashed. The three signal models are required (:class:`ModelError` names
    the missing one and the script to run); an unsigned or tampered set is a :class:`ModelIntegrityError`.
    """
    from backtest.trees import compile_booster

    folder = Path(models_dir)
    names = list(feature_names)
    require(folder, SIGNAL_KEYS, "the backtest / live predictor")  # missing signal models: the friendly message
    key = signing if signing is not None else signing_key(folder=folder)
    manifest = read_verified_manifest(folder, key)
    table = manifest["models"]
    present = [k for k in FILES if k in table]
    blobs = {k: _verified_bytes(folder, k, table[k], names if k in _FEATURE_CHECKED else None) for k in present}

    def load(k: str) -> Any:
        return decode_verified(blobs[k], _show(folder / FILES[k]))

    signal = {m: load(f"signal_{m}") for m in SIGNAL_MODELS}
    sltp = load("sl_tp") if "sl_tp" in present else None
    exit_model = None
    if "position" in present:
        pos = load("position")
        exit_model = (compile_booster(pos.booster), _market_cols(pos, names))
    risk = compile_booster(load("risk").booster) if "risk" in present else None
    return ModelBundle(folder=folder, _feature_names=names, signal_models=signal, sltp_model=sltp,
                       _exit_model=exit_model, _risk_model=risk, manifest=manifest, weights=weights)


# ------------------------------------------------------------------------------------------- the deployed pair
@dataclass
class Deployed:
    """``config.json`` and ``models/`` read as one consistent pair (:func:`load_deployed`)."""

    config: Any  # core.config.Config
    bundle: ModelBundle
    config_sha256: str
    manifest_sha256: str


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise ModelError(f"{_show(path)} cannot be read ({exc})") from None


def _snapshot(journal: Path, config: Path, manifest: Path) -> tuple[bool, str | None, str | None]:
    return journal.exists(), _sha256(config), _sha256(manifest)


def load_deployed(paths: Any, *, config_path: str | os.PathLike[str] | None = None,
                  models_dir: str | os.PathLike[str] | None = None, retry_wait_s: float = 1.0) -> Deployed:
    """Read the deployed ``config.json`` and ``models/`` together under one consistent view.

    Why: the deploy switch (:mod:`ops.deploy`) renames ``models/`` and then replaces ``config.json``; a reader that
    reads them in two steps can pair a new config with old models (or find ``models/`` missing) during that short
    window. Here the state is snapshotted (deploy journal present?, sha256 of ``config.json`` and of the manifest)
    before and after the config is parsed and the models are verified and loaded; the pair is accepted only when no
    switch was in progress (no journal) and both snapshots are equal, i.e. the loaded config and models are the
    bytes of one deployed state. Otherwise it waits ``retry_wait_s`` and tries once more, then fails with one line
    (:class:`ModelError`, exit 2). ``paths`` is a :class:`core.paths.Paths`; ``config_path`` / ``models_dir``
    override its files (the journal check still applies to the root).
    """
    from core.config import load_config
    from market.features import feature_names

    cfg_file = Path(config_path) if config_path else paths.config
    folder = Path(models_dir) if models_dir else paths.models
    journal = paths.journal
    key = signing_key(paths.root)
    last: str = ""
    for attempt in range(2):
        if attempt:
            time.sleep(retry_wait_s)
        before = _snapshot(journal, cfg_file, folder / MANIFEST)
        if before[0]:
            last = f"a model/config switch is in progress ({_show(journal)} exists)"
            continue
        try:
            cfg = load_config(cfg_file)
            bundle = load_bundle(folder, feature_names(cfg), signing=key)
        except ModelError as exc:
            # a switch between reading the manifest and a file looks like a modified file: retry only when the
            # state did move; an integrity failure of a state that stood still is never retried away
            if _snapshot(journal, cfg_file, folder / MANIFEST) != before:
                last = f"models/ changed while being read ({exc})"
                continue
            raise
        after = _snapshot(journal, cfg_file, folder / MANIFEST)
        if after == before and before[1] is not None and before[2] is not None:
            return Deployed(config=cfg, bundle=bundle, config_sha256=str(before[1]), manifest_sha256=str(before[2]))
        last = "config.json or models/ changed while being read (a deploy switched them)"
    raise ModelError(f"{_show(cfg_file)} + {_show(folder)}: no consistent pair after a retry: {last}; if no run is "
                     f"deploying, an interrupted switch awaits recovery: run scripts/weekly_optimize.py (it recovers "
                     f"first) and try again")
