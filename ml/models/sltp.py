"""The SL/TP models: two LightGBM quantile regressors for the stop and target distances (ATR units) at each entry.

Why learned distances: a fixed 1.5 / 2.0 ATR bracket is too tight in a trending, noisy market and too loose in a
quiet one. The right stop is "beyond the heat a good trade takes", the right target "where comparable trades
reliably get to"; both are conditional on the market state, which is what the features describe.

Labels (documented rule, :func:`excursions` / :func:`sltp_rows`)
----------------------------------------------------------------
For every signal entry on the training window (every bar where :func:`backtest.policy.entry_gate` gives a side;
entries may overlap: each is a possible entry state), with the fill ``entry`` at the next open (costs paid, rule R5)
and ``a = atr`` at the decision bar (the ATR rule R6 scales the distances with):

1. **Holding period**: from the fill bar ``e`` until the bar ``b`` at whose close the backtester would exit by rule
   R12: the saved *position model* says exit (probability >= ``trading.exit_threshold``) or ``max_holding_bars`` is
   reached. The position model sees the state of a position with the config's fixed stop/target (the bracket it was
   trained with), but stop and target hits do **not** end the period: the labels must not be censored by the very
   levels they are meant to replace.
2. ``MFE`` = the largest favourable excursion over bars ``e..b`` (high for a long, low for a short) from ``entry``,
   in units of ``a``; ``t*`` = the first bar reaching it.
3. ``MAE_pre`` = the largest adverse excursion over bars ``e..t*`` (inclusive: inside one bar the order of high and
   low is unknown, and the backtester counts the stop first), in units of ``a``: the heat the trade took before its
   best price. A trade that only went against us has ``t* = e`` and a small ``MAE_pre``: its stop *should* be tight.
4. Targets: ``tp_label = MFE``, ``sl_label = MAE_pre``, each clipped to ``[0, LABEL_CAP]``.

Models: LightGBM quantile regression, ``SL_QUANTILE`` (0.7) for the stop ("a stop that 70% of comparable entries
survive until their best price") and ``TP_QUANTILE`` (0.5) for the target ("a target that half of the comparable
entries reach within the holding period"); predictions clipped to ``[CLIP_MIN, CLIP_MAX]`` ATR. The input is the
dataset's full feature row at the decision bar (the bundle checks this list like the signal's), so the backtester
can compute the distances once for all bars (``Predictor.sltp``); the side is not an input, because the predictor
protocol asks for distances per bar, and the features that decide the side are in the row anyway.
The backtester multiplies the outputs by ``sl_multiplier`` / ``tp_multiplier`` (rule R6).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
from numba import njit

from backtest.policy import (
    FLAT,
    LONG,
    N_POS,
    Params,
    decision_clock,
    entry_fill,
    entry_gate,
    make_params,
    model_exit,
    stop_target_distances,
    stops_from_fill,
    time_exit,
)
from backtest.trees import CompiledTrees, compile_booster
from core.config import Config, default_config
from core.errors import TooFewTrades
from ml.models.manifest import SIGNAL_KEYS
from ml.models.position import (
    full_probabilities,
    lgb_params,
    require_models,
    signal_probabilities,
    train_booster,
)

SL_QUANTILE = 0.7
TP_QUANTILE = 0.5
CLIP_MIN = 0.5
CLIP_MAX = 6.0
LABEL_CAP = 10.0

DEFAULT_PARAMS: dict[str, Any] = {
    # entries overlap (neighbouring bars share most of their holding period), so a big leaf floor; 0.1 x 200 rounds
    # keeps the two quantile fits (slower than L2: leaf values are re-estimated as quantiles) at a few seconds
    "learning_rate": 0.1,
    "num_leaves": 15,
    "min_data_in_leaf": 200,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "max_bin": 63,
    "num_boost_round": 200,
    "early_stopping_rounds": 20,
}


@dataclass
class SltpModel:
    """Stop and target distances in ATR units from the full feature row (columns ``feature_names``, in order)."""

    sl_booster: lgb.Booster
    tp_booster: lgb.Booster
    feature_names: list[str]
    clip: tuple[float, float] = (CLIP_MIN, CLIP_MAX)
    quantiles: tuple[float, float] = (SL_QUANTILE, TP_QUANTILE)
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        """``(n, 2)`` float64 ``[sl_atr, tp_atr]``, clipped to ``clip`` (what ``Predictor.sltp`` returns).

        Row-wise: one row alone or in a batch gives the same numbers (the step/fast parity needs that)."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if X.shape[1] != len(self.feature_names):
            raise ValueError(f"SL/TP model expects {len(self.feature_names)} columns, got {X.shape[1]}")
        lo, hi = self.clip
        sl = np.clip(self.sl_booster.predict(X), lo, hi)
        tp = np.clip(self.tp_booster.predict(X), lo, hi)
        return np.column_stack([sl, tp]).astype(np.float64)

    def compiled(self) -> tuple[CompiledTrees, CompiledTrees]:
        """Both boosters as arrays (for a compiled caller)."""
        return compile_booster(self.sl_booster), compile_booster(self.tp_booster)

    # ---------------------------------------------------------------------------- persistence (ml.models.archive)
    def to_archive(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        """(meta, members): both boosters as LightGBM model text, everything else as JSON (no pickle)."""
        from ml.models.archive import lgb_text

        meta = {"type": "sl_tp", "feature_names": list(self.feature_names), "clip": list(self.clip),
                "quantiles": list(self.quantiles), "params": self.params, "seed": int(self.seed), "info": self.info}
        return meta, {"sl.lgb.txt": lgb_text(self.sl_booster), "tp.lgb.txt": lgb_text(self.tp_booster)}

    @classmethod
    def from_archive(cls, meta: Mapping[str, Any], files: Mapping[str, bytes], what: str) -> SltpModel:
        """Inverse of :meth:`to_archive` (the archive was verified by the caller)."""
        from ml.models.archive import lgb_from_text, member

        lo, hi = (float(v) for v in meta["clip"])
        q_sl, q_tp = (float(v) for v in meta["quantiles"])
        return cls(sl_booster=lgb_from_text(member(files, "sl.lgb.txt", what), what),
                   tp_booster=lgb_from_text(member(files, "tp.lgb.txt", what), what),
                   feature_names=[str(f) for f in meta["feature_names"]], clip=(lo, hi), quantiles=(q_sl, q_tp),
                   params=dict(meta["params"]), seed=int(meta["seed"]), info=dict(meta["info"]))


# ================================================================================================== labels
@njit(cache=True)
def excursions(high: np.ndarray, low: np.ndarray, side: int, entry: float, first: int, last: int,
               atr: float) -> tuple[float, float, float, int]:
    """``(mae_pre, mfe, mae_total, t_star)`` of a position on bars ``first..last`` (inclusive), in units of ``atr``.

    See the module docstring: ``mfe`` the best favourable excursion (>= 0), ``t_star`` the first bar reaching it,
    ``mae_pre`` the worst adverse excursion up to and including ``t_star``, ``mae_total`` over the whole period."""
    best = 0.0
    t_star = first
    for j in range(first, last + 1):
        fav = high[j] - entry if side == LONG else entry - low[j]
        if fav > best:
            best = fav
            t_star = j
    mae_pre = 0.0
    mae_tot = 0.0
    for j in range(first, last + 1):
        adv = entry - low[j] if side == LONG else high[j] - entry
        if adv > mae_tot:
            mae_tot = adv
        if j <= t_star and adv > mae_pre:
            mae_pre = adv
    return mae_pre / atr, best / atr, mae_tot / atr, t_star


@njit(cache=True)
def _entry_windows(open_: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray, spread: np.ndarray,
                   atr: np.ndarray, hour: np.ndarray, p_long: np.ndarray, p_short: np.ndarray, cand: np.ndarray,
                   end: int, exit_X: np.ndarray, exit_trees: CompiledTrees, use_exit: bool, p: Params,
                   o_bar: np.ndarray, o_side: np.ndarray, o_last: np.ndarray, o_sl: np.ndarray, o_tp: np.ndarray,
                   o_mae_tot: np.ndarray) -> int:
    """Labels for each candidate decision bar in ``cand`` (sorted) whose holding period ends before ``end``."""
    xbuf = np.empty(N_POS + exit_X.shape[1])
    k = 0
    for i in range(cand.size):
        t = cand[i]
        if t + 1 >= end:
            break
        side, _code = entry_gate(t, p_long[t], p_short[t], hour[t], spread[t], False, False, 0, p)
        if side == FLAT:
            continue
        sl_d, tp_d, ok = stop_target_distances(np.nan, np.nan, atr[t], False, p)
        if not ok:
            continue
        e = t + 1
        entry = entry_fill(open_[e], side, spread[e], p)
        stop, target = stops_from_fill(entry, side, sl_d, tp_d)
        last = -1
        for b in range(e, end):
            reason = time_exit(b, e, p)
            if reason == 0 and use_exit:
                reason = model_exit(b, e, side, close[b], entry, stop, target, atr[b], exit_X[b], xbuf, exit_trees,
                                    p)
            if reason != 0:
                last = b
                break
        if last < 0:
            continue  # the holding period runs past the window: no complete label
        mae_pre, mfe, mae_tot, _ts = excursions(high, low, side, entry, e, last, atr[t])
        o_bar[k] = t
        o_side[k] = side
        o_last[k] = last
        o_sl[k] = mae_pre
        o_tp[k] = mfe
        o_mae_tot[k] = mae_tot
        k += 1
    return k


@dataclass
class SltpRows:
    """Entries and their labels: ``bars`` (decision bars), ``side``, ``last_bar`` (end of the holding period),
    ``sl`` / ``tp`` labels (ATR), ``mae_total`` (for reports) and the feature rows ``X`` (float32, ds columns)."""

    bars: np.ndarray
    side: np.ndarray
    last_bar: np.ndarray
    sl: np.ndarray
    tp: np.ndarray
    mae_total: np.ndarray
    X: np.ndarray

    @property
    def n(self) -> int:
        return int(self.bars.size)


def sltp_rows(ds: Any, p_long_short: np.ndarray, cfg: Config | None, positions: np.ndarray,
              exit_model: tuple[CompiledTrees, np.ndarray] | None, params: Params | None = None) -> SltpRows:
    """Label every signal entry on ``positions`` (module docstring). ``exit_model`` is ``(trees, market column
    indices into ds.features)`` of the position model (``PositionModel.exit_model(ds.feature_names)``); None walks
    the holding period by ``max_holding_bars`` alone."""
    cfg = cfg or default_config()
    p = params if params is not None else make_params(cfg)
    positions = np.asarray(positions, dtype=np.int64)
    candles = ds.candles
    n = len(candles)
    F = ds.features.to_numpy(np.float32)
    if positions.size == 0:
        z = np.zeros(0)
        return SltpRows(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), z, z.copy(), z.copy(),
                        np.zeros((0, F.shape[1]), np.float32))
    pls = full_probabilities(p_long_short, n, positions)
    embargo = int(getattr(getattr(ds, "splits", None), "embargo", cfg.splits.embargo_bars))
    end = min(n, int(positions[-1]) + 1 + embargo)
    if exit_model is not None:
        trees, cols = exit_model
        exit_X = np.ascontiguousarray(F[:, np.asarray(cols, dtype=np.int64)], dtype=np.float64)
        use = True
    else:
        from backtest.trees import empty_trees

        trees, exit_X, use = empty_trees(0), np.zeros((n, 0)), False
    col = lambda name: np.ascontiguousarray(candles[name].to_numpy(np.float64))  # noqa: E731
    atr = ds.features["atr"].to_numpy(np.float32).astype(np.float64)
    hour, _ = decision_clock(candles.index.as_unit("ns").asi8)
    m = positions.size
    o_bar, o_side, o_last = (np.empty(m, np.int64) for _ in range(3))
    o_sl, o_tp, o_mt = (np.empty(m) for _ in range(3))
    k = _entry_windows(col("open"), col("high"), col("low"), col("close"), col("spread"), atr,
                       np.ascontiguousarray(hour), np.ascontiguousarray(pls[:, 0]), np.ascontiguousarray(pls[:, 1]),
                       np.ascontiguousarray(positions), end, exit_X, trees, use, p, o_bar, o_side, o_last, o_sl,
                       o_tp, o_mt)
    bars = o_bar[:k].copy()
    return SltpRows(bars=bars, side=o_side[:k].copy(), last_bar=o_last[:k].copy(),
                    sl=np.clip(o_sl[:k], 0.0, LABEL_CAP), tp=np.clip(o_tp[:k], 0.0, LABEL_CAP),
                    mae_total=o_mt[:k].copy(), X=F[bars])


# ================================================================================================== fit + metrics
def pinball(y: np.ndarray, pred: np.ndarray, q: float) -> float:
    """Mean quantile (pinball) loss: what a ``q``-quantile regressor minimises."""
    d = np.asarray(y, dtype=np.float64) - np.asarray(pred, dtype=np.float64)
    return float(np.mean(np.maximum(q * d, (q - 1.0) * d))) if d.size else float("nan")


def fit_sltp_model(X: np.ndarray, sl: np.ndarray, tp: np.ndarray, feature_names: Sequence[str],
                   params: Mapping[str, Any] | None, seed: int,
                   eval_set: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> SltpModel:
    """Two LightGBM quantile regressors (``SL_QUANTILE`` on ``sl``, ``TP_QUANTILE`` on ``tp``), early-stopped on
    ``eval_set = (X_val, sl_val, tp_val)`` when given. Deterministic (one thread, fixed seeds)."""
    names = list(feature_names)
    X = np.asarray(X)
    if X.shape[0] < 50:
        raise TooFewTrades(f"SL/TP model: only {X.shape[0]} labelled entries; lower trading.confidence_threshold or "
                        "add history")
    boosters = []
    infos = {}
    used: dict[str, Any] = {}
    for what, q, yv, k in (("sl", SL_QUANTILE, sl, 1), ("tp", TP_QUANTILE, tp, 2)):
        lp, rounds, es = lgb_params(DEFAULT_PARAMS, params, seed, {"objective": "quantile", "alpha": q,
                                                                   "metric": "quantile"})
        ev = (eval_set[0], eval_set[k]) if eval_set is not None else None
        b, info = train_booster(X, yv, lp, rounds, es, names, ev)
        boosters.append(b)
        infos[what] = info
        used = {kk: v for kk, v in lp.items() if kk not in ("deterministic", "force_row_wise", "num_threads",
                                                            "verbosity", "alpha") and not kk.endswith("seed")}
        used["early_stopping_rounds"] = es
    return SltpModel(sl_booster=boosters[0], tp_booster=boosters[1], feature_names=names, params=used,
                     seed=int(seed), info={"rounds": {k: v["rounds"] for k, v in infos.items()}})


def sltp_metrics(model: SltpModel, rows: SltpRows, fit_rows: SltpRows | None = None) -> dict[str, Any]:
    """Pinball loss against a constant-quantile baseline (the fit window's quantile: what a model without features
    would say), the coverage each quantile promises, and the predicted distances' spread."""
    if rows.n == 0:
        return {"n": 0}
    pred = model.predict(rows.X)
    ref = fit_rows if fit_rows is not None and fit_rows.n else rows
    base_sl = float(np.clip(np.quantile(ref.sl, SL_QUANTILE), CLIP_MIN, CLIP_MAX))
    base_tp = float(np.clip(np.quantile(ref.tp, TP_QUANTILE), CLIP_MIN, CLIP_MAX))
    out: dict[str, Any] = {"n": rows.n}
    for what, j, q, y, base in (("sl", 0, SL_QUANTILE, rows.sl, base_sl), ("tp", 1, TP_QUANTILE, rows.tp, base_tp)):
        lm = pinball(y, pred[:, j], q)
        lb = pinball(y, np.full(y.size, base), q)
        out[what] = {
            "quantile": q, "pinball": lm, "pinball_const": lb, "skill": 1.0 - lm / lb if lb > 0 else 0.0,
            "const": base, "pred_mean": float(pred[:, j].mean()), "pred_p10": float(np.quantile(pred[:, j], 0.1)),
            "pred_p90": float(np.quantile(pred[:, j], 0.9)), "label_mean": float(y.mean()),
        }
    out["sl"]["coverage"] = float(np.mean(rows.sl <= pred[:, 0]))  # promised ~SL_QUANTILE
    out["tp"]["reach_rate"] = float(np.mean(rows.tp >= pred[:, 1]))  # promised ~1 - TP_QUANTILE
    return out


# ================================================================================================== training
def train_sltp(ds: Any, cfg: Config | None, models_dir: Path | str,
               params: Mapping[str, Any] | None = None) -> tuple[SltpModel, dict[str, Any]]:
    """Fit on the entries of ``ds.splits.fit``, early-stop and score on those of ``ds.splits.calib``.

    Requires the saved signal ensemble and position model in ``models_dir`` (:class:`UserError` otherwise)."""
    from ml.models import manifest

    cfg = cfg or default_config()
    models_dir = Path(models_dir)
    require_models(models_dir, (*SIGNAL_KEYS, "position"), "SL/TP model")
    t0 = time.perf_counter()
    pos_model = manifest.load_model(models_dir, "position", None)
    exit_model = pos_model.exit_model(ds.feature_names)
    sp = ds.splits
    fit_pos, cal_pos = np.asarray(sp.fit, np.int64), np.asarray(sp.calib, np.int64)
    pls = signal_probabilities(models_dir, ds, np.concatenate([fit_pos, cal_pos]))
    t_sig = time.perf_counter() - t0
    tr = sltp_rows(ds, pls, cfg, fit_pos, exit_model)
    va = sltp_rows(ds, pls, cfg, cal_pos, exit_model)
    t_rows = time.perf_counter() - t0 - t_sig
    if va.n < 10:
        raise TooFewTrades(f"SL/TP model: only {va.n} validation entries on the calibration window; lower "
                        "trading.confidence_threshold or add history")
    model = fit_sltp_model(tr.X, tr.sl, tr.tp, ds.feature_names, params, int(cfg.tuning.seed),
                           eval_set=(va.X, va.sl, va.tp))
    t_fit = time.perf_counter() - t0 - t_sig - t_rows
    metrics = {
        "val": sltp_metrics(model, va, tr),
        "n_entries": {"fit": tr.n, "val": va.n},
        "holding_bars_mean": float(np.mean(tr.last_bar - tr.bars)) if tr.n else 0.0,
        "rounds": model.info.get("rounds"),
        "timings_s": {"signal_proba": round(t_sig, 3), "rows": round(t_rows, 3), "fit": round(t_fit, 3)},
    }
    idx = ds.candles.index
    model.info.update(train_range={"start": str(idx[int(fit_pos[0])]), "end": str(idx[int(cal_pos[-1])]),
                                   "n_fit": tr.n, "n_val": va.n},
                      data_hash=ds.data_hash(np.arange(int(fit_pos[0]), min(len(idx), int(cal_pos[-1]) + 1 +
                                                                          int(sp.embargo)))))
    return model, metrics
