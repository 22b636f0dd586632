"""The signal ensemble: RandomForest, XGBoost and LightGBM classifiers on the triple-barrier labels, calibrated.

Classes are the label indices of :class:`market.dataset.Dataset`: ``0`` short wins, ``1`` no trade, ``2`` long wins.

Why these choices:

* **Cheap by construction** (the weekly run, 100 tuning trials included, must fit in 20 minutes on 2 cores):
  histogram-based boosting (``tree_method="hist"``, LightGBM's native histograms, ``max_bin`` ~128), a shallow,
  bootstrap-subsampled random forest (``max_samples``), float32 inputs, early stopping on a validation fold.
* **Deterministic**: every model gets the seed; LightGBM runs with ``deterministic=True`` and ``force_row_wise=True``
  (its row-/column-wise auto choice is timing-based and so not reproducible); the forest draws each tree's seed
  from ``random_state`` up front, so its fitted trees do not depend on ``n_jobs`` (it is then set to predict
  single-threaded: a threaded forest adds the trees' probabilities in a run-dependent order). XGBoost's CPU ``hist`` is
  deterministic for a given thread count. Same seed, data and ``n_jobs`` therefore give bit-identical predictions.
* **Threads**: the forest parallelises over independent trees and scales with ``n_jobs``; the boosters
  synchronise their OpenMP threads at every tree level, which collapses when the cores are shared. Measured on
  this 2-core machine with another job running: XGBoost early stopping 1.5 s on 1 thread vs 12 s on 2 (idle:
  1.5 s vs 0.9 s). :func:`train_signal` therefore runs the boosters single-threaded by default, which also makes
  their output independent of the machine's core count.
* **Calibrated on later data**: a tree ensemble's scores are not probabilities, and the trading threshold
  (``confidence_threshold``) is a probability. Each fitted model is wrapped in
  ``CalibratedClassifierCV(FrozenEstimator(model))`` and calibrated on the chronologically later, purged slice
  ``Dataset.splits.calib`` that none of the models trained on (``cv="prefit"`` no longer exists in scikit-learn
  1.8+). Sigmoid below 1000 calibration samples (isotonic overfits small sets), isotonic above.
* **Honest early stopping**: the number of boosting rounds is chosen on the last walk-forward fold's validation
  block (never on data the model trained on), then the model is refit on the whole ``fit`` window with that round
  count scaled by the data ratio (see :func:`train_signal`).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator

from core.config import Config, default_config
from core.errors import UserError

SIGNAL_MODELS = ("rf", "xgb", "lgb")
N_CLASSES = 3  # 0 short, 1 flat, 2 long
CLASS_NAMES = ("short", "flat", "long")
ISOTONIC_MIN_SAMPLES = 1000
DEFAULT_EARLY_STOPPING_ROUNDS = 30
_FIT_ONLY_KEYS = ("early_stopping_rounds",)  # keys of params that steer fitting, not the constructor


class SignalModelError(UserError):
    """The training data cannot produce a usable signal model (e.g. a class never occurs)."""


def default_params() -> dict[str, dict[str, Any]]:
    """Hyperparameters used when no tuned set exists (``results/best_params_signal.json``).

    Measured on the real BTC file's ``fit`` window (52k samples x 41 features, 2 cores): the forest below fits in
    ~2.5 s and scores the same macro F1 as 150 unrestricted-depth trees at a fifth of the cost; the boosters stop
    early after a few dozen rounds at this learning rate, so ``n_estimators`` is a cap, not a cost.
    """
    return {
        "rf": {
            "n_estimators": 100,
            "max_depth": 8,
            "min_samples_leaf": 100,
            "max_features": "sqrt",
            "max_samples": 0.3,
            "bootstrap": True,
        },
        "xgb": {
            "n_estimators": 600,
            "learning_rate": 0.05,
            "max_depth": 4,
            "min_child_weight": 10.0,
            "subsample": 0.8,
            "colsample_bytree": 0.8,
            "reg_lambda": 1.0,
            "max_bin": 128,
            "early_stopping_rounds": DEFAULT_EARLY_STOPPING_ROUNDS,
        },
        "lgb": {
            "n_estimators": 600,
            "learning_rate": 0.05,
            "num_leaves": 15,
            "min_child_samples": 50,
            "subsample": 0.8,
            "subsample_freq": 1,
            "colsample_bytree": 0.8,
            "reg_lambda": 1.0,
            "max_bin": 127,
            "early_stopping_rounds": DEFAULT_EARLY_STOPPING_ROUNDS,
        },
    }


def _check_name(name: str) -> None:
    if name not in SIGNAL_MODELS:
        raise ValueError(f"unknown signal model {name!r}; expected one of {SIGNAL_MODELS}")


def _ctor_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in dict(params or {}).items() if k not in _FIT_ONLY_KEYS}


def make_model(name: str, params: Mapping[str, Any] | None, seed: int, n_jobs: int = 1) -> Any:
    """An unfitted scikit-learn-API classifier for ``name`` ("rf", "xgb" or "lgb").

    ``params`` are constructor arguments (plus ``early_stopping_rounds``, used by :func:`fit_signal_models`).
    The seed, thread count and the settings that make results reproducible are applied last, so a tuned parameter
    set can never switch determinism off by accident.
    """
    _check_name(name)
    p = _ctor_params(params)
    if name == "rf":
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(**p, random_state=seed, n_jobs=n_jobs)
    if name == "xgb":
        import xgboost as xgb

        p.setdefault("eval_metric", "mlogloss")
        p.pop("tree_method", None)
        return xgb.XGBClassifier(**p, tree_method="hist", objective="multi:softprob", random_state=seed,
                                 n_jobs=n_jobs, verbosity=0)
    import lightgbm as lgb

    for k in ("verbose", "deterministic", "force_row_wise", "force_col_wise", "random_state", "seed"):
        p.pop(k, None)
    return lgb.LGBMClassifier(**p, objective="multiclass", random_state=seed, n_jobs=n_jobs, deterministic=True,
                              force_row_wise=True, verbose=-1)


def _check_classes(y: np.ndarray, what: str) -> None:
    present = np.unique(y)
    if present.size != N_CLASSES or not np.array_equal(present, np.arange(N_CLASSES)):
        names = [CLASS_NAMES[int(c)] for c in present if 0 <= c < N_CLASSES]
        raise SignalModelError(
            f"{what} contains only the classes {names} ({len(y)} samples): every class (short, flat, long) must "
            f"occur; use more history (config data.history_days) or other label barriers (config labels.*)"
        )


def fit_signal_models(X: np.ndarray, y: np.ndarray, params: Mapping[str, Mapping[str, Any]], seed: int,
                      n_jobs: int = 1, eval_set: tuple[np.ndarray, np.ndarray] | None = None,
                      sample_weight: np.ndarray | None = None) -> dict[str, Any]:
    """Fit one classifier per key of ``params`` (a subset of :data:`SIGNAL_MODELS`) on ``X``, ``y``, side by side
    (:func:`side_by_side`; the same models as one after the other). An unknown key is refused before any fit.

    With ``eval_set=(Xv, yv)`` the boosters stop early on ``Xv`` (``early_stopping_rounds`` from their params,
    default 30) and predict with their best iteration; the forest ignores it. Models see float32 inputs.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    _check_classes(y, "the training labels")
    Xv = yv = None
    if eval_set is not None:
        Xv = np.ascontiguousarray(eval_set[0], dtype=np.float32)
        yv = np.asarray(eval_set[1], dtype=np.int64)

    def fit(name: str) -> Any:
        p = params[name] or {}
        model = make_model(name, p, seed, n_jobs)
        rounds = int(p.get("early_stopping_rounds", DEFAULT_EARLY_STOPPING_ROUNDS) or 0)
        if name == "rf":
            model.fit(X, y, sample_weight=sample_weight)
            # A threaded forest sums its trees' probabilities in scheduling order, so repeated predict_proba calls
            # differ in the last bit (measured). Fit in parallel, predict single-threaded: bitwise reproducible
            # predictions in the backtest, the bot and the round-trip check, at ~0.3 s per 70k rows.
            model.set_params(n_jobs=1)
        elif name == "xgb":
            if Xv is not None and rounds > 0:
                model.set_params(early_stopping_rounds=rounds)
                model.fit(X, y, sample_weight=sample_weight, eval_set=[(Xv, yv)], verbose=False)
            else:
                model.fit(X, y, sample_weight=sample_weight, verbose=False)
        else:
            import lightgbm as lgb

            if Xv is not None and rounds > 0:
                model.fit(X, y, sample_weight=sample_weight, eval_X=(Xv,), eval_y=(yv,),
                          callbacks=[lgb.early_stopping(rounds, first_metric_only=True, verbose=False)])
            else:
                model.fit(X, y, sample_weight=sample_weight)
        return model

    return side_by_side(fit, check_model_names(params))


def side_by_side(fn: Callable[[str], Any], names: Sequence[str]) -> dict[str, Any]:
    """``{name: fn(name)}`` with the calls in threads side by side (one name: called here).

    For the signal models' independent jobs (fits, SHAP explanations): each model has its own seed and its own
    single-threaded library, so the results are those of one call after the other, while the forest's Python
    overlaps the boosters' native code, which releases the GIL."""
    names = list(names)
    if len(names) <= 1:
        return {name: fn(name) for name in names}
    with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="signal-model") as pool:
        return dict(zip(names, pool.map(fn, names), strict=True))


def check_model_names(params: Mapping[str, Any]) -> list[str]:
    """The keys of ``params`` in :data:`SIGNAL_MODELS` order (the forest first); an unknown key is an error."""
    unknown = set(params) - set(SIGNAL_MODELS)
    if unknown:
        raise ValueError(f"unknown signal model(s) {sorted(unknown)}; expected {SIGNAL_MODELS}")
    return [name for name in SIGNAL_MODELS if name in params]


def rounds_used(model: Any) -> int | None:
    """Boosting rounds a fitted booster predicts with (its best iteration after early stopping); None for RF."""
    if hasattr(model, "best_iteration_") and getattr(model, "best_iteration_", 0):  # lightgbm: 1-based, 0 = no ES
        return int(model.best_iteration_)
    if type(model).__name__ == "XGBClassifier":
        try:
            return int(model.best_iteration) + 1  # xgboost: 0-based
        except AttributeError:
            return int(model.get_booster().num_boosted_rounds())
    if hasattr(model, "n_estimators_"):  # lightgbm without early stopping
        return int(model.n_estimators_)
    return None


def calibrate_models(models: Mapping[str, Any], X_cal: np.ndarray, y_cal: np.ndarray) -> dict[str, Any]:
    """Wrap each fitted model in a calibrator fit on ``X_cal``, ``y_cal`` (``Dataset.splits.calib``).

    The slice must be chronologically later than and purged from the models' training data, otherwise the
    calibrator learns the models' in-sample overconfidence. Sigmoid (Platt) below 1000 samples, isotonic above.
    """
    X_cal = np.ascontiguousarray(X_cal, dtype=np.float32)
    y_cal = np.asarray(y_cal, dtype=np.int64)
    _check_classes(y_cal, "the calibration slice")
    method = "sigmoid" if len(y_cal) < ISOTONIC_MIN_SAMPLES else "isotonic"
    # One split whose test part is the whole slice: the frozen model predicts the slice once. The default (cv=None)
    # predicts it in 5 stratified chunks with the same frozen model (``ensemble="auto"`` is off for a
    # FrozenEstimator), which gives the same predictions row for row, hence the same fitted calibrator, at 5x the
    # per-call overhead (measured: ~16 % of a tuning trial on 1-3k-row folds). ``cv`` is put back to its default
    # afterwards: the split list was only how the predictions were computed, not part of the model.
    whole = [(np.empty(0, dtype=np.int64), np.arange(len(y_cal)))]
    out: dict[str, Any] = {}
    for name, model in models.items():
        cal = CalibratedClassifierCV(FrozenEstimator(model), method=method, cv=whole)
        cal.fit(X_cal, y_cal)
        cal.cv = None
        out[name] = cal
    return out


def underlying(model: Any) -> Any:
    """The fitted tree model inside a calibrated wrapper (or the model itself): what SHAP and reports need.

    A LightGBM model loaded from its model text is a :class:`BoosterClassifier`; its ``lightgbm.Booster`` is returned
    (SHAP explains a Booster exactly like the ``LGBMClassifier`` it came from: the same trees)."""
    if isinstance(model, CalibratedClassifierCV):
        model = model.calibrated_classifiers_[0].estimator
    if isinstance(model, FrozenEstimator):
        model = model.estimator
    if isinstance(model, BoosterClassifier):
        model = model.booster_
    return model


# ================================================================================================ persistence
class BoosterClassifier(ClassifierMixin, BaseEstimator):
    """A fitted LightGBM multiclass booster with the scikit-learn classifier API the calibrator and the ensemble use.

    Why not ``LGBMClassifier``: a saved LightGBM model is its model text (no pickle), and an ``LGBMClassifier`` can
    only be rebuilt from a ``Booster`` by setting private attributes that change between LightGBM versions. This class
    predicts with the booster exactly as ``LGBMClassifier.predict_proba`` does (``Booster.predict`` on the same array,
    every tree of the saved text = the best iteration): bit-identical probabilities (tested). It cannot be refit.
    """

    def __init__(self, booster: Any = None, classes: Any = None) -> None:
        self.booster = booster
        self.classes = classes

    def __sklearn_is_fitted__(self) -> bool:
        return self.booster is not None

    @property
    def booster_(self) -> Any:
        """The ``lightgbm.Booster`` (same name as on ``LGBMClassifier``)."""
        return self.booster

    @property
    def classes_(self) -> np.ndarray:
        return np.asarray(self.classes, dtype=np.int64)

    @property
    def n_features_in_(self) -> int:
        return int(self.booster.num_feature())

    def fit(self, X: Any, y: Any) -> BoosterClassifier:  # noqa: N803
        raise TypeError("a BoosterClassifier is a loaded model: train an LGBMClassifier instead")

    def decision_function(self, X: Any) -> np.ndarray:  # noqa: N803
        """Raw margins, as ``LGBMClassifier.decision_function`` (LightGBM >= 4.7): what the calibrator is fit on."""
        return np.asarray(self.booster.predict(np.asarray(X), raw_score=True), dtype=np.float64)

    def predict_proba(self, X: Any) -> np.ndarray:  # noqa: N803
        p = np.asarray(self.booster.predict(np.asarray(X)), dtype=np.float64)
        return np.column_stack([1.0 - p, p]) if p.ndim == 1 else p

    def predict(self, X: Any) -> np.ndarray:  # noqa: N803
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


# what a signal archive's meta.json "type" may say (ml.models.archive dispatches on it)
CLASSIFIER_TYPES = ("sklearn", "xgboost", "lightgbm", "calibrated")
_NATIVE_MEMBER = {"xgboost": "estimator.xgb.ubj", "lightgbm": "estimator.lgb.txt"}


def _native_kind(model: Any) -> str | None:
    """"xgboost" / "lightgbm" for a booster stored natively, None for a scikit-learn model (stored with skops)."""
    import lightgbm as lgb
    import xgboost as xgb

    if isinstance(model, xgb.XGBClassifier):
        return "xgboost"
    if isinstance(model, lgb.LGBMClassifier | BoosterClassifier):
        return "lightgbm"
    return None


def _encode_native(model: Any, kind: str) -> tuple[dict[str, Any], bytes]:
    from ml.models.archive import lgb_text

    classes = np.asarray(model.classes_).astype(np.int64).tolist()
    if kind == "xgboost":
        if classes != list(range(len(classes))):
            raise ValueError(f"an XGBoost model must be fit on labels 0..K-1, got classes {classes}")
        return {"classes": classes}, bytes(model.get_booster().save_raw("ubj"))
    return {"classes": classes}, lgb_text(model.booster_)


def _decode_native(kind: str, meta: Mapping[str, Any], files: Mapping[str, bytes], what: str) -> Any:
    from ml.models.archive import ArchiveError, lgb_from_text, member

    data = member(files, _NATIVE_MEMBER[kind], what)
    classes = [int(c) for c in meta["classes"]]
    if kind == "lightgbm":
        return BoosterClassifier(lgb_from_text(data, what), classes)
    import xgboost as xgb

    model = xgb.XGBClassifier()
    try:
        model.load_model(bytearray(data))
    except xgb.core.XGBoostError as exc:
        raise ArchiveError(f"{what}: the XGBoost model does not parse ({str(exc).splitlines()[0]})") from None
    if list(np.asarray(model.classes_).tolist()) != classes:
        raise ArchiveError(f"{what}: the XGBoost model has classes {model.classes_.tolist()}, meta.json {classes}")
    return model


def encode_classifier(model: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(meta, members) of a signal classifier's archive (see :mod:`ml.models.archive`).

    * a scikit-learn model (the forest), calibrated or not: one skops member;
    * a bare XGBoost / LightGBM classifier: its native model (UBJSON / model text);
    * a calibrated booster: the calibrator in skops with its frozen estimator emptied (a copy: ``model`` itself is
      not touched) plus the booster natively; loading puts the booster back into the same ``FrozenEstimator``.
    """
    from ml.models.archive import skops_dumps

    inner = underlying_estimator(model)
    kind = _native_kind(inner)
    if kind is None and not isinstance(model, ClassifierMixin):
        raise TypeError(f"cannot save a {type(model).__name__} as a model: not a classifier or one of our models")
    if kind is None:
        return {"type": "sklearn", "class": type(model).__name__}, {"model.skops": skops_dumps(model)}
    meta, native = _encode_native(inner, kind)
    files = {_NATIVE_MEMBER[kind]: native}
    if not isinstance(model, CalibratedClassifierCV):
        return {"type": kind, **meta}, files
    if len(model.calibrated_classifiers_) != 1:
        raise ValueError("a calibrated booster is saved with exactly one calibrated classifier (FrozenEstimator)")
    empty = FrozenEstimator(None)
    shell = copy.copy(model)
    cc = copy.copy(model.calibrated_classifiers_[0])
    cc.estimator = empty
    shell.estimator = empty
    shell.calibrated_classifiers_ = [cc]
    files["calibration.skops"] = skops_dumps(shell)
    return {"type": "calibrated", "estimator": kind, **meta}, files


def decode_classifier(meta: Mapping[str, Any], files: Mapping[str, bytes], what: str) -> Any:
    """The classifier held by a signal archive (inverse of :func:`encode_classifier`)."""
    from ml.models.archive import ArchiveError, member, skops_loads

    kind = meta["type"]
    if kind == "sklearn":
        model = skops_loads(member(files, "model.skops", what), what)
        if not isinstance(model, ClassifierMixin | CalibratedClassifierCV):
            raise ArchiveError(f"{what}: holds a {type(model).__name__}, not a classifier")
        return model
    if kind in _NATIVE_MEMBER:
        return _decode_native(kind, meta, files, what)
    est_kind = meta["estimator"]
    if est_kind not in _NATIVE_MEMBER:
        raise ArchiveError(f"{what}: unknown calibrated estimator type {est_kind!r}")
    shell = skops_loads(member(files, "calibration.skops", what), what)
    if (not isinstance(shell, CalibratedClassifierCV) or not isinstance(shell.estimator, FrozenEstimator)
            or shell.estimator.estimator is not None or len(shell.calibrated_classifiers_) != 1
            or shell.calibrated_classifiers_[0].estimator is not shell.estimator):
        raise ArchiveError(f"{what}: calibration.skops is not the calibrator of one frozen booster")
    shell.estimator.estimator = _decode_native(est_kind, meta, files, what)
    return shell


def underlying_estimator(model: Any) -> Any:
    """The model inside a calibrated / frozen wrapper (the wrapper-free object, not the Booster of a LightGBM one)."""
    if isinstance(model, CalibratedClassifierCV):
        model = model.calibrated_classifiers_[0].estimator
    if isinstance(model, FrozenEstimator):
        model = model.estimator
    return model


def _proba3(model: Any, X: np.ndarray) -> np.ndarray:
    """predict_proba mapped onto the three class columns (robust to a model that knows fewer classes)."""
    return _as3(model, model.predict_proba(X))


def _as3(model: Any, native: Any) -> np.ndarray:
    """A model's own ``predict_proba`` output as (n, 3) float64 in the class order short, flat, long."""
    p = np.asarray(native, dtype=np.float64)
    classes = np.asarray(getattr(model, "classes_", np.arange(p.shape[1]))).astype(np.int64)
    if p.shape[1] == N_CLASSES and np.array_equal(classes, np.arange(N_CLASSES)):
        return p
    out = np.zeros((p.shape[0], N_CLASSES), dtype=np.float64)
    out[:, classes] = p
    return out


class _Served(FrozenEstimator):
    """A frozen model whose ``predict_proba`` answers with probabilities computed before, for the one ``X`` they
    were computed on (see :func:`raw_and_calibrated_proba`); every other method is the model's own."""

    def __init__(self, estimator: Any, served: Any = None) -> None:
        super().__init__(estimator)
        self.served = served

    def predict_proba(self, X: Any) -> Any:
        return self.served


def raw_and_calibrated_proba(model: Any, calibrated: Any, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (n, 3) probabilities of a model and of its :func:`calibrate_models` wrapper on ``X``, as
    :func:`ensemble_proba` computes each model's, with the model's trees walked once: the calibrators read the
    model's ``predict_proba(X)`` computed for the first result instead of predicting ``X`` a second time.

    The same bits as two separate calls (tested; the calibrators get the model's own output, float32 for XGBoost,
    as in ``predict_proba``). A model with a ``decision_function`` (LightGBM) is calibrated on that, which is
    computed as usual. Why: in a tuning fold the predictions on the validation block cost about a quarter of the
    fold, half of it the repeated walk.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    native = model.predict_proba(X)
    raw = _as3(model, native)
    if calibrated is model:
        return raw, raw
    parts = calibrated.calibrated_classifiers_
    if any(getattr(c.estimator, "estimator", None) is not model for c in parts):  # not this model's calibrator
        return raw, _proba3(calibrated, X)
    saved = [c.estimator for c in parts]
    try:
        for c in parts:
            c.estimator = _Served(c.estimator, native)
        cal = _proba3(calibrated, X)
    finally:
        for c, est in zip(parts, saved, strict=True):
            c.estimator = est
    return raw, cal


def ensemble_proba(models: Mapping[str, Any], X: np.ndarray,
                   weights: Mapping[str, float] | Sequence[float] | None = None) -> np.ndarray:
    """(n, 3) weighted mean of the models' class probabilities (columns short, flat, long).

    Models are combined in :data:`SIGNAL_MODELS` order so the floating-point sum is the same on every call.
    ``weights`` is a mapping name -> weight or a sequence in that order; None means equal weights.
    """
    names, w = _ensemble_weights(models, weights)
    X = np.ascontiguousarray(X, dtype=np.float32)
    used = {name: float(wi) for name, wi in zip(names, w, strict=True) if wi > 0}
    return combine_proba({name: _proba3(models[name], X) for name in used}, used)


def combine_proba(probas: Mapping[str, np.ndarray],
                  weights: Mapping[str, float] | Sequence[float] | None = None) -> np.ndarray:
    """What :func:`ensemble_proba` returns, from the models' own (n, 3) probabilities computed elsewhere (e.g. by
    :func:`raw_and_calibrated_proba` in a tuning fold): the same weights, order and arithmetic, so the same bits."""
    names, w = _ensemble_weights(probas, weights)
    acc = np.zeros((np.asarray(probas[names[0]]).shape[0], N_CLASSES), dtype=np.float64)
    for wi, name in zip(w, names, strict=True):
        if wi > 0:
            acc += wi * np.asarray(probas[name], dtype=np.float64)
    return acc / w.sum()


def _ensemble_weights(models: Mapping[str, Any], weights: Mapping[str, float] | Sequence[float] | None
                      ) -> tuple[list[str], np.ndarray]:
    names = [n for n in SIGNAL_MODELS if n in models] + [n for n in models if n not in SIGNAL_MODELS]
    if not names:
        raise ValueError("ensemble_proba needs at least one model")
    if weights is None:
        w = np.ones(len(names))
    elif isinstance(weights, Mapping):
        w = np.array([float(weights.get(n, 0.0)) for n in names])
    else:
        w = np.asarray(list(weights), dtype=np.float64)
        if w.size != len(names):
            raise ValueError(f"{w.size} weights for {len(names)} models")
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"ensemble weights must be non-negative with a positive sum, got {w.tolist()}")
    return names, w


def p_long_short(proba: np.ndarray) -> np.ndarray:
    """(n, 2) ``[p_long, p_short]`` from (n, 3) class probabilities: what the backtester's Predictor returns."""
    proba = np.asarray(proba, dtype=np.float64)
    return np.column_stack([proba[:, 2], proba[:, 0]])


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: |accuracy - confidence| of the predicted class, averaged over equal-width confidence bins."""
    proba = np.asarray(proba, dtype=np.float64)
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == np.asarray(y_true)).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def signal_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Macro F1, accuracy, multiclass Brier (mean over samples of the summed squared error, 0..2), top-label ECE
    and log loss (probabilities clipped to 1e-7: isotonic calibration can output exact zeros)."""
    from sklearn.metrics import accuracy_score, f1_score

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(proba, dtype=np.float64)
    pred = p.argmax(axis=1)
    onehot = np.eye(N_CLASSES)[y]
    pc = np.clip(p, 1e-7, 1.0)
    pc /= pc.sum(axis=1, keepdims=True)
    return {
        "n": int(y.size),
        "f1_macro": float(f1_score(y, pred, average="macro", labels=list(range(N_CLASSES)), zero_division=0)),
        "accuracy": float(accuracy_score(y, pred)),
        "brier": float(np.mean(np.sum((p - onehot) ** 2, axis=1))),
        "ece": expected_calibration_error(y, p),
        "log_loss": float(-np.mean(np.log(pc[np.arange(y.size), y]))),
    }


def _thread_counts(n_jobs: int | None) -> tuple[int, int]:
    """(forest threads, booster threads): all cores for the forest, one for the boosters unless told otherwise."""
    if n_jobs is not None:
        return max(1, int(n_jobs)), max(1, int(n_jobs))
    return max(1, os.cpu_count() or 1), 1


def train_signal(ds: Any, cfg: Config | None = None, params: Mapping[str, Mapping[str, Any]] | None = None,
                 n_jobs: int | None = None, refit: bool = True) -> dict[str, Any]:
    """Fit, early-stop and calibrate the ensemble on a :class:`market.dataset.Dataset`; return models and metrics.

    Steps (positions from ``ds.splits``, which already hold only CUSUM events when ``labels.cusum_atr > 0``):

    1. the boosters are fit on the last walk-forward fold's training part and early-stopped on its validation
       block (purged), which fixes their round counts honestly;
    2. with ``refit`` (default) all three are fit on the whole ``fit`` window, the boosters with the found round
       count scaled by ``len(fit) / len(fold train)`` (more data supports more rounds); without it the
       early-stopped boosters are used as they are (cheaper, 25% less data);
    3. each model is calibrated on ``splits.calib``.

    ``n_jobs=None``: the forest on all cores, the boosters on one thread (see the module docstring).

    Returns ``models`` (calibrated, what gets saved), ``raw`` (uncalibrated), ``params`` (effective, with the
    boosters' final ``n_estimators``), ``metrics``, ``seed``, ``feature_names``, ``train_range``, ``data_hash``
    and ``timings_s``. ``metrics["val"]`` scores the raw models on the calibration slice, which they never trained
    on (out of sample); ``metrics["calib_in_sample"]`` scores the calibrated ensemble on the same slice (in sample
    for the calibrator, so only a sanity check); ``metrics["early_stop_fold"]`` scores the early-stopped boosters
    on the fold they stopped on.
    """
    cfg = cfg or default_config()
    seed = int(cfg.tuning.seed)
    rf_jobs, boost_jobs = _thread_counts(n_jobs)
    base = default_params()
    use = {name: {**base[name], **dict((params or {}).get(name, {}) or {})} for name in SIGNAL_MODELS}
    sp = ds.splits
    X, y = ds.X, ds.y
    fit, calib = np.asarray(sp.fit), np.asarray(sp.calib)
    if fit.size == 0 or calib.size == 0 or not sp.folds:
        raise SignalModelError("the dataset has no fit/calibration window: not enough history (data.history_days)")
    fold_tr, fold_va = sp.folds[-1]
    timings: dict[str, float] = {}
    metrics: dict[str, Any] = {}

    final = {k: dict(v) for k, v in use.items()}
    ratio = fit.size / max(1, fold_tr.size)

    def chain(name: str) -> tuple[Any, Any, dict[str, float]]:
        """One model's whole path (a booster: early stop, then the refit): the three paths are independent."""
        t0 = time.perf_counter()
        if name == "rf":
            model = fit_signal_models(X[fit], y[fit], {"rf": final["rf"]}, seed, rf_jobs)["rf"]
            return model, None, {"fit_rf": time.perf_counter() - t0}
        es = fit_signal_models(X[fold_tr], y[fold_tr], {name: use[name]}, seed, boost_jobs,
                               eval_set=(X[fold_va], y[fold_va]))[name]
        t_es = time.perf_counter() - t0
        best = rounds_used(es) or int(use[name]["n_estimators"])
        if not refit:
            final[name]["n_estimators"] = best
            return es, es, {"early_stop": t_es}
        final[name]["n_estimators"] = max(1, math.ceil(best * ratio))
        final[name]["early_stopping_rounds"] = 0
        return fit_signal_models(X[fit], y[fit], {name: final[name]}, seed, boost_jobs)[name], es, {"early_stop": t_es}

    # The forest and the two boosters' paths side by side (each library single-threaded for the boosters, the same
    # models as one after the other): the phase takes the longest path instead of the sum.
    t0 = time.perf_counter()
    done = side_by_side(chain, SIGNAL_MODELS)
    timings["fit"] = time.perf_counter() - t0  # all three paths, early stopping included
    timings["early_stop"] = max(d[2].get("early_stop", 0.0) for d in done.values())
    timings["fit_rf"] = done["rf"][2]["fit_rf"]
    raw = {name: done[name][0] for name in SIGNAL_MODELS}
    es = {name: done[name][1] for name in ("xgb", "lgb")}
    metrics["early_stop_fold"] = {k: {**signal_metrics(y[fold_va], _proba3(m, X[fold_va])),
                                      "rounds": rounds_used(m) or int(use[k]["n_estimators"])}
                                  for k, m in es.items()}

    t0 = time.perf_counter()
    calibrated = calibrate_models(raw, X[calib], y[calib])
    timings["calibrate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    Xc, yc = X[calib], y[calib]
    raw_p = {k: _proba3(m, Xc) for k, m in raw.items()}
    metrics["val"] = {k: signal_metrics(yc, p) for k, p in raw_p.items()}
    metrics["val"]["ensemble"] = signal_metrics(yc, np.mean([raw_p[k] for k in SIGNAL_MODELS], axis=0))
    metrics["calib_in_sample"] = signal_metrics(yc, ensemble_proba(calibrated, Xc))
    metrics["calibration_method"] = "sigmoid" if calib.size < ISOTONIC_MIN_SAMPLES else "isotonic"
    timings["metrics"] = time.perf_counter() - t0

    t1 = ds.labels["t1"].to_numpy(np.int64)
    last = int(max(t1[fit].max(), t1[calib].max()))
    idx = ds.features.index
    train_range = {
        "start": str(idx[int(fit[0])]), "end": str(idx[int(calib[-1])]), "last_label_bar": str(idx[last]),
        "n_fit": int(fit.size), "n_calib": int(calib.size),
        "fit_end": str(idx[int(fit[-1])]), "calib_start": str(idx[int(calib[0])]),
    }
    return {
        "models": calibrated, "raw": raw, "params": final, "metrics": metrics, "seed": seed,
        "n_jobs": {"rf": rf_jobs, "boosters": boost_jobs},
        "feature_names": list(ds.feature_names), "train_range": train_range,
        "data_hash": ds.data_hash(np.arange(0, last + 1)), "timings_s": timings,
    }
