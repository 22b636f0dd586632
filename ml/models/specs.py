"""The model table: one :class:`ModelSpec` per trained model (or group: the signal ensemble), in training order.

Why a table: phases 7-10 of the weekly run and the four retrain scripts train, save and check the same models.
Written twice, the two paths drifted (different manifest metadata, a round-trip check in one only). Each spec says
once what a model needs (``prerequisites`` in the folder it is trained against), how it is trained, what is recorded
in the manifest, and how a saved copy is probed; :func:`train_and_save` is the one path both callers use.

Everything heavy (numba, LightGBM, scikit-learn) is imported inside the spec functions, so checking prerequisites
from this table costs milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config
from core.errors import UserError
from ml.models.manifest import SIGNAL_KEYS, load_model, require, save_model

PROBE_ROWS = 256


@dataclass
class Trained:
    """What one spec's training produced: the objects to save (by manifest key) and the trainer's metrics."""

    models: dict[str, Any]
    metrics: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # trainer-specific output (signal: params, timings, ...)
    seconds: float = 0.0


@dataclass(frozen=True)
class ModelSpec:
    """One row of the model table."""

    name: str  # "signal", "position", "sl_tp", "risk": also the study kind of results/best_params_<name>.json
    keys: tuple[str, ...]  # the manifest keys it writes
    label: str  # for messages ("position model needs the signal models: ...")
    prerequisites: tuple[str, ...]  # manifest keys that must be in the folder it is trained against
    script: str  # the retrain script that (re)creates it
    downstream: tuple[str, ...]  # models trained on top of this one (a retrain makes them stale)
    nested_params: bool  # tuned params per sub-model ({"rf": {...}, ...}) rather than one flat mapping
    all_entries: bool  # learns from every entry the sweep could open: trained with entry_config(cfg)
    train: Callable[[Any, Config, Path, Mapping[str, Any] | None, int | None], Trained]
    save: Callable[[Path, Trained, Any, bool], None]  # (folder, trained, dataset, demo)
    feature_names: Callable[[str, Any, Any], list[str]]  # (key, model, dataset) -> the columns it reads
    probe: Callable[[Mapping[str, Any], Any], Any]  # (models by key, dataset) -> predictions for the round trip
    summary: Callable[[Mapping[str, Any] | None], str]  # a manifest entry's metrics -> one short text

    @property
    def params_file(self) -> str:
        return f"best_params_{self.name}.json"


def entry_config(cfg: Config) -> Config:
    """``cfg`` with the entry threshold at the active profile's minimum. The position and SL/TP models learn from
    every position the sweep could open (it may choose any threshold inside the profile's bounds), and at the
    active threshold there are often too few simulated trades to learn exits from."""
    from core.config import parse_config

    raw = cfg.model_dump(mode="json")
    raw["trading"]["confidence_threshold"] = cfg.profile.confidence_threshold.min
    return parse_config(raw, "config (entry threshold at the profile's minimum)")


def _f(m: Mapping[str, Any] | None, *keys: str) -> float:
    cur: Any = m or {}
    for k in keys:
        cur = cur.get(k) if isinstance(cur, Mapping) else None
    try:
        return float(cur) if cur is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")



def _with_oos_start(train_range: dict[str, Any], ds: Any) -> dict[str, Any]:
    """The trainer's own range plus where the run's OOS window starts: provenance that every manifest entry
    carries, so that anyone (the replay's cut test, an auditor) can check a set never trained on its OOS days."""
    return {**train_range, "oos_start": str(ds.candles.index[ds.splits.oos_start])}

def _save_booster_model(folder: Path, t: Trained, ds: Any, demo: bool, spec_key: str,
                        names: Callable[[Any, Any], list[str]]) -> None:
    """The position, SL/TP and risk models: train range and data hash as their trainer recorded them."""
    model = t.models[spec_key]
    info = getattr(model, "info", {}) or {}
    save_model(folder, spec_key, model, feature_names=names(model, ds),
               train_range=_with_oos_start(info.get("train_range", {}), ds),
               data_hash=str(info.get("data_hash", ds.data_hash())), params=getattr(model, "params", None) or {},
               seed=int(getattr(model, "seed", 0)), metrics={**t.metrics, "demo": demo}, kind=spec_key)


# ------------------------------------------------------------------------------------------------ signal
def _signal_train(ds: Any, cfg: Config, folder: Path, params: Mapping[str, Any] | None, n_jobs: int | None
                  ) -> Trained:
    from ml.models.signal import train_signal

    res = train_signal(ds, cfg, params, n_jobs=n_jobs)
    return Trained(models={f"signal_{m}": model for m, model in res["models"].items()}, metrics=res["metrics"],
                   extra=res)


def _signal_save(folder: Path, t: Trained, ds: Any, demo: bool) -> None:
    res = t.extra
    method = res["metrics"]["calibration_method"]
    for key, model in t.models.items():
        name = key.removeprefix("signal_")
        metrics = {
            "val": res["metrics"]["val"][name],
            "val_ensemble": res["metrics"]["val"]["ensemble"],
            "calib_in_sample_ensemble": res["metrics"]["calib_in_sample"],
            "early_stop_fold": res["metrics"]["early_stop_fold"].get(name),
            "demo": demo,
        }
        save_model(folder, key, model, feature_names=res["feature_names"],
                   train_range=_with_oos_start(res["train_range"], ds),
                   data_hash=res["data_hash"],
                   params={**res["params"][name], "calibration": method, "n_jobs": res["n_jobs"]},
                   seed=res["seed"], metrics=metrics, kind=f"{key} (calibrated {method}, 3 classes)")


def _signal_probe(models: Mapping[str, Any], ds: Any) -> Any:
    from ml.models.signal import ensemble_proba

    calib = ds.splits.calib
    return ensemble_proba({k.removeprefix("signal_"): m for k, m in models.items()}, ds.X[calib[: 2 * PROBE_ROWS]])


def _signal_summary(m: Mapping[str, Any] | None) -> str:
    v = (m or {}).get("val")
    if not v:
        return "n/a"
    return (f"val F1 {_f(v, 'f1_macro'):.4f} acc {_f(v, 'accuracy'):.4f} brier {_f(v, 'brier'):.4f} "
            f"ece {_f(v, 'ece'):.4f}")


# ------------------------------------------------------------------------------------------------ position
def _position_train(ds: Any, cfg: Config, folder: Path, params: Mapping[str, Any] | None, n_jobs: int | None
                    ) -> Trained:
    from ml.models.position import train_position

    model, metrics = train_position(ds, cfg, folder, params=params)
    return Trained(models={"position": model}, metrics=metrics)


def _position_probe(models: Mapping[str, Any], ds: Any) -> Any:
    model = models["position"]
    rng = np.random.default_rng(0)
    return model.predict_exit(rng.normal(size=(PROBE_ROWS, len(model.feature_names))))


# ------------------------------------------------------------------------------------------------ SL/TP
def _sltp_train(ds: Any, cfg: Config, folder: Path, params: Mapping[str, Any] | None, n_jobs: int | None
                ) -> Trained:
    from ml.models.sltp import train_sltp

    model, metrics = train_sltp(ds, cfg, folder, params=params)
    return Trained(models={"sl_tp": model}, metrics=metrics)


# ------------------------------------------------------------------------------------------------ risk
def _risk_train(ds: Any, cfg: Config, folder: Path, params: Mapping[str, Any] | None, n_jobs: int | None
                ) -> Trained:
    from ml.models.risk import train_risk

    model, metrics = train_risk(ds, cfg, folder, params=params)
    return Trained(models={"risk": model}, metrics=metrics)


def _account_features() -> list[str]:
    from backtest.policy import ACCOUNT_STATE_FEATURES

    return list(ACCOUNT_STATE_FEATURES)


def _risk_probe(models: Mapping[str, Any], ds: Any) -> Any:
    rng = np.random.default_rng(0)
    return models["risk"].multiplier(np.abs(rng.normal(size=(PROBE_ROWS, len(_account_features())))))


# ------------------------------------------------------------------------------------------------ the table
SPECS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec(
        name="signal", keys=SIGNAL_KEYS, label="signal models", prerequisites=(), script="retrain_signal.py",
        downstream=("position", "sl_tp", "risk"), nested_params=True, all_entries=False, train=_signal_train,
        save=_signal_save,
        feature_names=lambda key, model, ds: list(ds.feature_names), probe=_signal_probe, summary=_signal_summary,
    ),
    ModelSpec(
        name="position", keys=("position",), label="position model", prerequisites=SIGNAL_KEYS,
        script="retrain_position.py", downstream=("sl_tp", "risk"), nested_params=False, all_entries=True,
        train=_position_train,
        save=lambda folder, t, ds, demo: _save_booster_model(folder, t, ds, demo, "position",
                                                             lambda model, ds: list(model.feature_names)),
        feature_names=lambda key, model, ds: list(model.feature_names), probe=_position_probe,
        summary=lambda m: (f"val acc {_f(m, 'val', 'accuracy'):.4f} exit precision "
                           f"{_f(m, 'val', 'exit_precision'):.4f} auc {_f(m, 'val', 'auc'):.4f} objective "
                           f"{_f(m, 'val', 'objective'):.4f} ({_f(m, 'val', 'n'):.0f} rows)"),
    ),
    ModelSpec(
        name="sl_tp", keys=("sl_tp",), label="SL/TP model", prerequisites=(*SIGNAL_KEYS, "position"),
        script="retrain_sltp.py", downstream=("risk",), nested_params=False, all_entries=True, train=_sltp_train,
        save=lambda folder, t, ds, demo: _save_booster_model(folder, t, ds, demo, "sl_tp",
                                                             lambda model, ds: list(ds.feature_names)),
        feature_names=lambda key, model, ds: list(ds.feature_names),
        probe=lambda models, ds: models["sl_tp"].predict(ds.X[ds.splits.calib[:PROBE_ROWS]]),
        summary=lambda m: (f"val sl skill {_f(m, 'val', 'sl', 'skill'):.4f} coverage "
                           f"{_f(m, 'val', 'sl', 'coverage'):.3f} mean {_f(m, 'val', 'sl', 'pred_mean'):.2f} ATR; "
                           f"tp skill {_f(m, 'val', 'tp', 'skill'):.4f} reach {_f(m, 'val', 'tp', 'reach_rate'):.3f} "
                           f"mean {_f(m, 'val', 'tp', 'pred_mean'):.2f} ATR ({_f(m, 'val', 'n'):.0f} entries)"),
    ),
    ModelSpec(
        name="risk", keys=("risk",), label="risk model", prerequisites=(*SIGNAL_KEYS, "position", "sl_tp"),
        script="retrain_risk.py", downstream=(), nested_params=False, all_entries=False, train=_risk_train,
        save=lambda folder, t, ds, demo: _save_booster_model(folder, t, ds, demo, "risk",
                                                             lambda model, ds: _account_features()),
        feature_names=lambda key, model, ds: _account_features(), probe=_risk_probe,
        summary=lambda m: (f"val rmse {_f(m, 'val', 'rmse'):.4f} (const 1.0: {_f(m, 'val', 'rmse_const1'):.4f}), "
                           f"sized mean R {_f(m, 'val', 'sized_mean_r'):.3f} vs unsized {_f(m, 'val', 'mean_r'):.3f}, "
                           f"multiplier {_f(m, 'val', 'mult_min'):.2f}..{_f(m, 'val', 'mult_max'):.2f} "
                           f"({_f(m, 'val', 'n'):.0f} trades)"),
    ),
)}


def train_and_save(spec: ModelSpec, ds: Any, cfg: Config, folder: Path, params: Mapping[str, Any] | None = None,
                   *, demo: bool = False, n_jobs: int | None = None) -> Trained:
    """Train ``spec`` against the models already in ``folder`` (its prerequisites; with ``cfg``, or
    :func:`entry_config` of it for the models that learn from every possible entry), save it there with its manifest
    entries, and check that the saved files load back (sha256 + feature list verified) and predict exactly what the
    trained objects predict. :class:`UserError` on a missing prerequisite or a failed round trip."""
    folder = Path(folder)
    if spec.prerequisites:
        require(folder, spec.prerequisites, spec.label)
    t0 = time.perf_counter()
    trained = spec.train(ds, entry_config(cfg) if spec.all_entries else cfg, folder, params, n_jobs)
    trained.seconds = time.perf_counter() - t0
    spec.save(folder, trained, ds, demo)
    loaded = {k: load_model(folder, k, spec.feature_names(k, m, ds)) for k, m in trained.models.items()}
    if not np.array_equal(np.asarray(spec.probe(loaded, ds)), np.asarray(spec.probe(trained.models, ds))):
        raise UserError(f"the {spec.label} saved in {folder} do not reproduce the trained models' predictions")
    return trained
