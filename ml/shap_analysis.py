"""SHAP importances of the three signal models: agreement, drift, and warnings a human should look at.

Why: feature importances are the cheapest early warning the weekly run has. One feature holding most of the
importance is the classic signature of label leakage (a column that encodes the future); features the three
models all ignore are candidates for removal (proposed, never dropped automatically: removing a feature changes
the live bot's input contract and needs a human); a large week-over-week rank change means the market or the data
changed. Session and news features are *protected*: they gate trading by design even when a week's models barely
use them, so they are marked and never proposed for dropping.

Cost: TreeExplainer is exact and polynomial in tree depth, linear in rows x trees. Measured on this 2-core machine
with the default models (41 features, 3 classes): XGBoost and LightGBM ~1.3-1.7 s for 2000 rows; the random forest
(100 trees, depth 8) ~1.4 s for 500 rows, so the forest gets a smaller seeded sample (``rf_sample``). Ranks of mean
|SHAP| are stable at these sizes; exact values are not needed.

Outputs under ``out_dir``: ``shap_importance.csv`` (one row per feature), ``shap_report.json`` (everything, the next
run's ``previous``) and ``shap_importance.png`` (top 25 features, matplotlib Agg backend: no display needed).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.io import atomic_write, atomic_write_text
from ml.models.signal import SIGNAL_MODELS, side_by_side, underlying

REPORT_JSON = "shap_report.json"
REPORT_CSV = "shap_importance.csv"
REPORT_PNG = "shap_importance.png"
LEAKAGE_SHARE = 0.5  # one feature above this share of a model's total |SHAP| -> leakage suspect
TOP_N_PLOT = 25


def _import_shap() -> Any:
    with warnings.catch_warnings():  # shap's import touches matplotlib colormap APIs that warn (not our concern)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        import shap
    return shap


def _mean_abs_shap(model: Any, rows: np.ndarray, n_features: int) -> np.ndarray:
    """Mean |SHAP| per feature over rows and classes (multiclass output: mean over the three class outputs)."""
    shap = _import_shap()
    explainer = shap.TreeExplainer(model)
    sv = explainer.shap_values(rows, check_additivity=False)
    arr = np.stack([np.asarray(s) for s in sv], axis=-1) if isinstance(sv, list) else np.asarray(sv)
    if arr.ndim == 2:  # (rows, features): single output
        return np.abs(arr).mean(axis=0)
    # (rows, features, classes) in current shap; be tolerant of (rows, classes, features)
    feat_axis = 1 if arr.shape[1] == n_features else 2
    other = tuple(a for a in range(arr.ndim) if a != feat_axis)
    return np.abs(arr).mean(axis=other)


def _previous_table(previous: Path | None) -> tuple[pd.DataFrame | None, str | None]:
    """(feature -> share, rank) of the previous run, from its shap_report.json (or the folder holding it)."""
    if previous is None:
        return None, None
    p = Path(previous)
    if p.is_dir():
        p = p / REPORT_JSON
    if not p.exists():
        return None, f"previous report {p} not found: no drift comparison this run"
    try:
        if p.suffix == ".csv":
            prev = pd.read_csv(p)
        else:
            prev = pd.DataFrame(json.loads(p.read_text(encoding="utf-8"))["features"])
        return prev.set_index("feature")[["mean_share", "rank"]], None
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"previous report {p} unreadable ({exc}): no drift comparison this run"


def _plot(table: pd.DataFrame, model_names: Sequence[str], path: Path, leak: set[str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    top = table.sort_values("rank").head(TOP_N_PLOT).iloc[::-1]
    fig = Figure(figsize=(9, 0.32 * len(top) + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(top))
    h = 0.8 / max(1, len(model_names))
    for i, name in enumerate(model_names):
        ax.barh(y + (i - (len(model_names) - 1) / 2) * h, top[f"share_{name}"].to_numpy(), height=h, label=name)
    labels = [f"{f}{' [protected]' if p else ''}{' [LEAK?]' if f in leak else ''}"
              for f, p in zip(top["feature"], top["protected"], strict=True)]
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("share of mean |SHAP| (per model, sums to 1)")
    ax.set_title(f"Signal models: SHAP importance, top {len(top)}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


def shap_report(models: Mapping[str, Any], X: np.ndarray, feature_names: Sequence[str], protected: Sequence[str],
                out_dir: str | os.PathLike[str], previous: Path | None = None, sample: int = 2000, seed: int = 42,
                rf_sample: int = 500, near_zero_share: float | None = None, rank_change: int = 10,
                leakage_share: float = LEAKAGE_SHARE) -> dict[str, Any]:
    """Explain ``models`` (fitted rf/xgb/lgb, calibrated or not) on a seeded row sample of ``X``; write and return
    the report.

    * Importance of a feature in a model = mean |SHAP| over the sampled rows and the three class outputs, normalised
      to shares summing to 1 per model; ``mean_share`` averages the models; ``rank`` 1 = most important.
    * ``near_zero``: share below ``near_zero_share`` (default: a tenth of the uniform share 1/n) in every model.
      Non-protected ones become ``drop_candidates``; protected ones are listed separately, never proposed.
    * ``leakage_suspects``: a feature holding more than ``leakage_share`` of any model's importance.
    * ``rank_changes``: |rank - previous rank| >= ``rank_change`` for a feature in the top half now or before
      (reshuffles among the near-zero tail are noise, not news).
    """
    t_all = time.perf_counter()
    X = np.asarray(X, dtype=np.float32)
    names = list(feature_names)
    nf = len(names)
    if X.ndim != 2 or X.shape[1] != nf:
        raise ValueError(f"X has shape {X.shape} but {nf} feature names were given")
    if X.shape[0] == 0:
        raise ValueError("shap_report needs at least one row")
    protected_set = set(protected)
    near_zero_share = 0.1 / nf if near_zero_share is None else float(near_zero_share)
    order = [m for m in SIGNAL_MODELS if m in models] + [m for m in models if m not in SIGNAL_MODELS]

    rng = np.random.default_rng(seed)
    perm = rng.permutation(X.shape[0])
    shares: dict[str, np.ndarray] = {}
    raw: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    n_rows: dict[str, int] = {}

    def explain(name: str) -> tuple[np.ndarray, float, int]:
        k = min(X.shape[0], rf_sample if name == "rf" else sample)
        rows = X[np.sort(perm[:k])]  # the forest's rows are a subset of the boosters' rows
        t0 = time.perf_counter()
        return _mean_abs_shap(underlying(models[name]), rows, nf), time.perf_counter() - t0, int(k)

    # The three explanations are independent: side by side (the boosters' SHAP is their own native code).
    _import_shap()  # once, here: importing from several threads at once would race the warnings filter
    explained = side_by_side(explain, order)
    for name in order:
        imp, secs, k = explained[name]
        seconds[name] = round(secs, 3)
        n_rows[name] = k
        raw[name] = imp
        total = float(imp.sum())
        shares[name] = imp / total if total > 0 else np.zeros(nf)

    table = pd.DataFrame({"feature": names})
    for name in order:
        table[f"share_{name}"] = shares[name]
        table[f"mean_abs_shap_{name}"] = raw[name]
    table["mean_share"] = np.mean([shares[m] for m in order], axis=0)
    table["rank"] = table["mean_share"].rank(ascending=False, method="first").astype(int)
    table["protected"] = table["feature"].isin(protected_set)
    table["near_zero"] = np.all([shares[m] < near_zero_share for m in order], axis=0)
    leak_rows = []
    for f_i, f in enumerate(names):
        over = {m: round(float(shares[m][f_i]), 4) for m in order if shares[m][f_i] > leakage_share}
        if over:
            leak_rows.append({"feature": f, "share": over, "models": sorted(over)})
    table["leakage_suspect"] = table["feature"].isin({r["feature"] for r in leak_rows})

    prev, prev_note = _previous_table(previous)
    rank_changes: list[dict[str, Any]] = []
    table["prev_rank"] = np.nan
    table["rank_change"] = np.nan
    if prev is not None:
        common = table["feature"].isin(prev.index)
        table.loc[common, "prev_rank"] = prev.loc[table.loc[common, "feature"], "rank"].to_numpy(dtype=float)
        table["rank_change"] = table["prev_rank"] - table["rank"]  # > 0: moved up
        half = nf / 2
        for r in table[common].itertuples(index=False):
            change = int(r.prev_rank - r.rank)
            if abs(change) >= rank_change and min(r.rank, r.prev_rank) <= half:
                rank_changes.append({"feature": r.feature, "prev_rank": int(r.prev_rank), "rank": int(r.rank),
                                     "change": change})
        rank_changes.sort(key=lambda d: -abs(d["change"]))

    agreement: dict[str, float | None] = {}
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            rho = _spearman(shares[a], shares[b])
            agreement[f"{a}~{b}"] = round(rho, 4) if np.isfinite(rho) else None  # None: a model with no splits
    finite = [v for v in agreement.values() if v is not None]

    near = table[table["near_zero"]]
    flags = {
        "drop_candidates": near.loc[~near["protected"], "feature"].tolist(),
        "protected_near_zero": near.loc[near["protected"], "feature"].tolist(),
        "leakage_suspects": leak_rows,
        "rank_changes": rank_changes,
    }
    warn_lines: list[str] = []
    for r in leak_rows:
        warn_lines.append(f"leakage suspect: {r['feature']} holds {max(r['share'].values()):.0%} of the importance "
                        f"in {', '.join(r['models'])}: check that it is computed only from past bars")
    if flags["drop_candidates"]:
        warn_lines.append(f"{len(flags['drop_candidates'])} feature(s) near zero in all models (candidates to drop, "
                        f"not dropped): {', '.join(flags['drop_candidates'][:10])}")
    for rc in rank_changes[:5]:
        warn_lines.append(f"rank change: {rc['feature']} {rc['prev_rank']} -> {rc['rank']}")
    if prev_note:
        warn_lines.append(prev_note)
    flag_lines = [  # the report's short list (the weekly report and Telegram show these lines)
        *([f"LEAKAGE SUSPECT (one feature holds most importance): {', '.join(r['feature'] for r in leak_rows)}"]
          if leak_rows else []),
        *([f"near zero in all three models (candidates, not dropped): {', '.join(flags['drop_candidates'])}"]
          if flags["drop_candidates"] else []),
        *([f"protected, near zero (kept): {', '.join(flags['protected_near_zero'])}"]
          if flags["protected_near_zero"] else []),
        *(f"rank change: {rc}" for rc in rank_changes[:10]),
    ]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = table.sort_values("rank").reset_index(drop=True)
    atomic_write(out / REPORT_CSV, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))
    t_plot = time.perf_counter()
    _plot(table, order, out / REPORT_PNG, {r["feature"] for r in leak_rows})
    seconds["plot"] = round(time.perf_counter() - t_plot, 3)
    seconds["total"] = round(time.perf_counter() - t_all, 3)

    features = [
        {"feature": r.feature, "rank": int(r.rank), "mean_share": float(r.mean_share),
         "share": {m: float(getattr(r, f"share_{m}")) for m in order}, "protected": bool(r.protected),
         "near_zero": bool(r.near_zero), "leakage_suspect": bool(r.leakage_suspect),
         "prev_rank": None if pd.isna(r.prev_rank) else int(r.prev_rank),
         "rank_change": None if pd.isna(r.rank_change) else int(r.rank_change)}
        for r in table.itertuples(index=False)
    ]
    report: dict[str, Any] = {
        "models": order, "n_rows": n_rows, "seed": int(seed), "n_features": nf,
        "thresholds": {"near_zero_share": near_zero_share, "leakage_share": leakage_share, "rank_change": rank_change},
        "rank_agreement": agreement,
        "mean_rank_agreement": round(float(np.mean(finite)), 4) if finite else None,
        "flags": flags, "flag_lines": flag_lines, "warnings": warn_lines,
        "previous": None if previous is None else str(previous),
        "seconds": seconds, "features": features,
        "files": {"csv": str(out / REPORT_CSV), "json": str(out / REPORT_JSON), "png": str(out / REPORT_PNG)},
    }
    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=2, allow_nan=False, default=_nan_none) + "\n")
    return report


def _nan_none(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


if __name__ == "__main__":  # the seed's spelling of the command (cli.shap; upward import listed in pyproject.toml)
    from cli.shap import entry

    entry()
