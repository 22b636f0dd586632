"""SHAP report: files written, a planted leak (a column equal to the label) flagged, protected features never
proposed for dropping, week-over-week drift read from the previous report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.models.signal import calibrate_models, fit_signal_models
from ml.shap_analysis import REPORT_CSV, REPORT_JSON, REPORT_PNG, shap_report

TINY = {
    "rf": {"n_estimators": 20, "max_depth": 5},
    "xgb": {"n_estimators": 30, "max_depth": 3},
    "lgb": {"n_estimators": 30, "num_leaves": 7, "min_child_samples": 10},
}
PROTECTED = ["hour_sin", "news_blackout", "sess_asia"]


def _data(seed: int, leak: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Three equally informative features, noise, a constant, protected columns (one constant), and optionally
    ``leak`` = the label itself."""
    rng = np.random.default_rng(seed)
    n = 3000
    a, b, c = rng.standard_normal((3, n))
    y = np.digitize(a + b + c + rng.standard_normal(n), [-1.0, 1.0]).astype(np.int64)
    cols = {
        "a": a, "b": b, "c": c, "noise1": rng.standard_normal(n), "noise2": rng.standard_normal(n),
        "const": np.zeros(n), "hour_sin": rng.standard_normal(n), "news_blackout": np.zeros(n),
        "sess_asia": (rng.random(n) < 0.3).astype(float),
    }
    if leak:
        cols["leak"] = y.astype(float)
    return np.column_stack(list(cols.values())).astype(np.float32), y, list(cols)


@pytest.fixture(scope="module")
def leaky() -> tuple[dict, np.ndarray, list[str]]:
    X, y, names = _data(0, leak=True)
    raw = fit_signal_models(X[:2000], y[:2000], TINY, seed=1)
    cal = calibrate_models({"rf": raw["rf"]}, X[2000:], y[2000:])
    return {"rf": cal["rf"], "xgb": raw["xgb"], "lgb": raw["lgb"]}, X[2000:], names  # calibrated rf: unwrapped


def test_report_files_flags_and_protection(tmp_path: Path, leaky: tuple) -> None:
    models, X, names = leaky
    out = tmp_path / "shap"
    rep = shap_report(models, X, names, PROTECTED, out, sample=600, rf_sample=200, seed=3)

    for f in (REPORT_CSV, REPORT_JSON, REPORT_PNG):
        assert (out / f).stat().st_size > 0, f
    assert (out / REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(out / REPORT_CSV)
    assert set(table["feature"]) == set(names) and table["rank"].tolist() == list(range(1, len(names) + 1))
    for m in ("rf", "xgb", "lgb"):
        assert abs(table[f"share_{m}"].sum() - 1.0) < 1e-5
    assert json.loads((out / REPORT_JSON).read_text())["flags"] == rep["flags"]

    suspects = {s["feature"]: s for s in rep["flags"]["leakage_suspects"]}
    assert list(suspects) == ["leak"] and "xgb" in suspects["leak"]["models"]
    assert any(w.startswith("leakage suspect: leak") for w in rep["warnings"])
    assert rep["features"][0]["feature"] == "leak"

    assert "const" in rep["flags"]["drop_candidates"]
    assert "news_blackout" in rep["flags"]["protected_near_zero"]
    assert not set(rep["flags"]["drop_candidates"]) & set(PROTECTED)  # protected: never proposed
    assert {f["feature"] for f in rep["features"] if f["protected"]} == set(PROTECTED)
    assert set(rep["rank_agreement"]) == {"rf~xgb", "rf~lgb", "xgb~lgb"}
    assert rep["n_rows"] == {"rf": 200, "xgb": 600, "lgb": 600}
    assert rep["seconds"]["total"] > 0 and rep["previous"] is None

    again = shap_report(models, X, names, PROTECTED, tmp_path / "again", sample=600, rf_sample=200, seed=3)
    assert again["features"] == rep["features"]  # seeded sample: same numbers


def test_no_leak_no_suspect_and_drift_against_previous(tmp_path: Path, leaky: tuple) -> None:
    X, y, names = _data(1, leak=False)
    models = fit_signal_models(X[:2000], y[:2000], TINY, seed=1)
    first = shap_report(models, X[2000:], names, PROTECTED, tmp_path / "w1", sample=600, rf_sample=200)
    assert first["flags"]["leakage_suspects"] == []
    top3 = {f["feature"] for f in first["features"][:3]}
    assert top3 == {"a", "b", "c"}

    # next week with the same models: ranks unchanged, no drift flags
    second = shap_report(models, X[2000:], names, PROTECTED, tmp_path / "w2", previous=tmp_path / "w1",
                         sample=600, rf_sample=200)
    assert second["flags"]["rank_changes"] == [] and all(f["rank_change"] == 0 for f in second["features"])

    # a week whose previous report ranked "a" last: a large rank change is flagged
    prev = json.loads((tmp_path / "w1" / REPORT_JSON).read_text())
    for f in prev["features"]:
        if f["feature"] == "a":
            f["rank"] = len(names)
    (tmp_path / "w1" / REPORT_JSON).write_text(json.dumps(prev))
    third = shap_report(models, X[2000:], names, PROTECTED, tmp_path / "w3", previous=tmp_path / "w1" / REPORT_JSON,
                        sample=600, rf_sample=200, rank_change=3)
    changes = {c["feature"]: c for c in third["flags"]["rank_changes"]}
    assert "a" in changes and changes["a"]["prev_rank"] == len(names) and changes["a"]["change"] > 0

    missing = shap_report(models, X[2000:], names, PROTECTED, tmp_path / "w4", previous=tmp_path / "nope",
                          sample=200, rf_sample=100)
    assert any("not found" in w for w in missing["warnings"])
