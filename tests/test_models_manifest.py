"""Model persistence: atomic saves with a manifest, each failure caught with its own message *before* unpickling,
the prerequisite order, staging with copy_set, the Predictor bundle, and scripts/retrain_signal.py end to end."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
from _toy_models import toy_models

from backtest.predictor import Predictor
from backtest.trees import predict_batch
from core.io import parse_tmp_name
from ml.models.bundle import load_bundle
from ml.models.manifest import (
    FILES,
    SIGNAL_KEYS,
    ModelError,
    copy_set,
    load_model,
    read_manifest,
    require,
    save_model,
    sign_manifest,
    signing_key,
    verify,
)
from ml.models.signal import calibrate_models, ensemble_proba, fit_signal_models, p_long_short

REPO = Path(__file__).resolve().parent.parent
NAMES = [f"f{i}" for i in range(6)]
TINY = {
    "rf": {"n_estimators": 10, "max_depth": 4},
    "xgb": {"n_estimators": 20, "max_depth": 2},
    "lgb": {"n_estimators": 20, "num_leaves": 4, "min_child_samples": 5},
}


class Evil:
    """A pickle payload that runs code when unpickled (creates a directory): what a tampered file could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def _xy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, len(NAMES))).astype(np.float32)
    y = np.digitize(X[:, 0] + 0.5 * rng.standard_normal(n), [-0.5, 0.5]).astype(np.int64)
    return X, y


@pytest.fixture(scope="module")
def signal_models() -> dict:
    X, y = _xy(800, 0)
    raw = fit_signal_models(X[:500], y[:500], TINY, seed=1)
    return calibrate_models(raw, X[500:], y[500:])


def _save_signal(folder: Path, models: dict, names: list[str] = NAMES) -> None:
    for k, m in models.items():
        save_model(folder, f"signal_{k}", m, feature_names=names, train_range={"start": "a", "end": "b"},
                   data_hash="d" * 64, params=TINY[k], seed=1, metrics={"val": {"f1_macro": np.float64(0.5)}},
                   kind=f"signal_{k}")


def _messages(fn) -> str:
    with pytest.raises(ModelError) as exc:
        fn()
    return str(exc.value)


def test_save_writes_file_and_manifest_atomically(tmp_path: Path, signal_models: dict) -> None:
    folder = tmp_path / "models"
    _save_signal(folder, signal_models)
    man = read_manifest(folder)
    assert set(man["models"]) == set(SIGNAL_KEYS)
    e = man["models"]["signal_rf"]
    for field in ("sha256", "size", "kind", "versions", "feature_names", "train_range", "data_hash", "params",
                  "seed", "metrics", "created_at", "code_version"):
        assert field in e, field
    assert set(e["versions"]) >= {"sklearn", "xgboost", "lightgbm", "numpy", "python"}
    assert e["feature_names"] == NAMES and e["size"] == (folder / FILES["signal_rf"]).stat().st_size
    assert e["created_at"].endswith("+00:00") and e["metrics"]["val"]["f1_macro"] == 0.5
    assert len(e["code_version"]) == 40 or e["code_version"] == "unknown"
    assert stat.S_IMODE((folder / FILES["signal_rf"]).stat().st_mode) == 0o644
    assert not [p for p in folder.iterdir() if parse_tmp_name(p.name)]  # no temp files left behind
    assert verify(folder, feature_names=NAMES).keys() == set(SIGNAL_KEYS)
    X, _ = _xy(50, 9)
    loaded = load_model(folder, "signal_xgb", NAMES)
    assert np.array_equal(loaded.predict_proba(X), signal_models["xgb"].predict_proba(X))

    # a failed save (not a model) changes nothing: the encoding happens before any file is touched
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(TypeError, match="cannot save a function"):
        save_model(folder, "signal_rf", lambda: 0, feature_names=NAMES, train_range={}, data_hash="", params={},
                   seed=1, metrics={}, kind="x")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    with pytest.raises(ModelError, match="unknown model key"):
        save_model(folder, "signal_svm", 1, feature_names=NAMES, train_range={}, data_hash="", params={}, seed=1,
                   metrics={}, kind="x")


def test_each_failure_has_its_own_message(tmp_path: Path, signal_models: dict) -> None:
    folder = tmp_path / "models"
    msgs = {"no_manifest": _messages(lambda: verify(folder))}
    assert "manifest.json missing" in msgs["no_manifest"]
    _save_signal(folder, signal_models)

    msgs["no_entry"] = _messages(lambda: verify(folder, ["position"]))
    assert "no entry for position" in msgs["no_entry"]

    msgs["names"] = _messages(lambda: verify(folder, feature_names=[*NAMES[:-1], "other"]))
    assert "feature mismatch" in msgs["names"] and "names differ" in msgs["names"] and "'other'" in msgs["names"]
    swapped = [NAMES[1], NAMES[0], *NAMES[2:]]
    msgs["order"] = _messages(lambda: load_model(folder, "signal_rf", swapped))
    assert "different order" in msgs["order"] and "column 0" in msgs["order"]

    sig = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**sig, "signature": {**sig["signature"], "hmac": "0" * 64}}))
    msgs["bad_signature"] = _messages(lambda: verify(folder))
    assert "signature does not match its content" in msgs["bad_signature"]
    (folder / "manifest.json").write_text(json.dumps({k: v for k, v in sig.items() if k != "signature"}))
    msgs["unsigned"] = _messages(lambda: verify(folder))
    assert "is not signed" in msgs["unsigned"] and "sign_models.py" in msgs["unsigned"]
    (folder / "manifest.json").write_text(json.dumps(sig))

    path = folder / FILES["signal_lgb"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    msgs["tampered"] = _messages(lambda: verify(folder))
    assert "was modified after it was saved" in msgs["tampered"] and "sha256" in msgs["tampered"]

    path.unlink()
    msgs["missing_file"] = _messages(lambda: load_model(folder, "signal_lgb", NAMES))
    assert "signal_lgb.zip missing" in msgs["missing_file"]

    (folder / "manifest.json").write_text("{not json")
    msgs["bad_json"] = _messages(lambda: read_manifest(folder))
    assert "not valid JSON" in msgs["bad_json"]

    firsts = [m.split(":")[0] + m.split(":")[-1] for m in msgs.values()]
    assert len(set(msgs.values())) == len(msgs) and len(set(firsts)) == len(firsts)
    assert all("\n" not in m for m in msgs.values())


def test_tampered_pickle_is_rejected_without_being_unpickled(tmp_path: Path, signal_models: dict) -> None:
    folder = tmp_path / "models"
    _save_signal(folder, signal_models)
    marker = tmp_path / "payload_ran"
    evil_file = tmp_path / "evil.joblib"
    joblib.dump(Evil(marker), evil_file)  # written by the test only: the positive control below
    (folder / FILES["signal_rf"]).write_bytes(evil_file.read_bytes())

    with pytest.raises(ModelError, match="modified"):
        load_model(folder, "signal_rf", NAMES)
    with pytest.raises(ModelError, match="modified"):
        load_bundle(folder, NAMES)
    with pytest.raises(ModelError, match="modified"):
        require(folder, SIGNAL_KEYS, "position model")
    assert not marker.exists()  # nothing was unpickled
    joblib.load(evil_file)  # positive control: the payload does run when loaded blindly
    assert marker.exists()


def test_prerequisite_order_is_enforced(tmp_path: Path, signal_models: dict) -> None:
    folder = tmp_path / "models"
    msg = _messages(lambda: require(folder, SIGNAL_KEYS, "position model"))
    assert msg.startswith("position model needs the signal models: ")
    assert "signal_rf.zip missing; run scripts/retrain_signal.py first" in msg

    _save_signal(folder, signal_models)
    assert set(require(folder, SIGNAL_KEYS, "position model")) == set(SIGNAL_KEYS)
    msg = _messages(lambda: require(folder, [*SIGNAL_KEYS, "position"], "SL/TP model"))
    assert msg.startswith("SL/TP model needs the position model: ") and "retrain_position.py" in msg
    msg = _messages(lambda: require(folder, [*SIGNAL_KEYS, "position", "sl_tp"], "risk model"))
    assert "retrain_position.py" in msg  # the first missing prerequisite is named first
    (folder / FILES["position"]).write_bytes(b"not recorded")
    msg = _messages(lambda: require(folder, ["position"], "SL/TP model"))
    assert "is not recorded in" in msg and "retrain_position.py" in msg


def test_copy_set_seeds_staging_and_removes_stale_files(tmp_path: Path, signal_models: dict) -> None:
    src, dst = tmp_path / "models", tmp_path / "staging" / "models"
    assert copy_set(src, dst) == [] and not (dst / "manifest.json").exists()  # first run: nothing deployed yet
    _save_signal(src, signal_models)
    (dst / FILES["risk"]).write_bytes(b"stale")
    assert sorted(copy_set(src, dst)) == sorted(SIGNAL_KEYS)
    assert not (dst / FILES["risk"]).exists()
    assert verify(dst, feature_names=NAMES).keys() == set(SIGNAL_KEYS)
    src_bytes = {p.name: p.read_bytes() for p in src.iterdir()}
    save_model(dst, "signal_rf", signal_models["lgb"], feature_names=NAMES, train_range={}, data_hash="", params={},
               seed=2, metrics={}, kind="replaced")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == src_bytes  # the deployed set is untouched
    assert read_manifest(dst)["models"]["signal_rf"]["kind"] == "replaced"
    assert read_manifest(dst)["models"]["signal_xgb"] == read_manifest(src)["models"]["signal_xgb"]
    (src / FILES["signal_lgb"]).write_bytes(b"tampered")  # a damaged deployed set is not propagated
    with pytest.raises(ModelError, match="signal_lgb.zip was modified"):
        copy_set(src, tmp_path / "staging2")


def test_bundle_is_a_verified_predictor(tmp_path: Path, signal_models: dict) -> None:
    folder = tmp_path / "models"
    _save_signal(folder, signal_models)
    rng = np.random.default_rng(3)
    market = ["f1", "f3"]
    pos, Xp, risk, Xr, sltp = toy_models(rng, NAMES, market, risk_min=0.25)
    meta = {"train_range": {}, "data_hash": "", "params": {}, "seed": 1, "metrics": {}}
    save_model(folder, "position", pos, feature_names=pos.feature_names, kind="position", **meta)
    save_model(folder, "risk", risk, feature_names=risk.feature_names, kind="risk", **meta)
    save_model(folder, "sl_tp", sltp, feature_names=NAMES, kind="sl_tp", **meta)

    b = load_bundle(folder, NAMES)
    assert isinstance(b, Predictor) and b.feature_names == NAMES
    X, _ = _xy(40, 5)
    assert np.array_equal(b.signal_proba(X), p_long_short(ensemble_proba(signal_models, X)))
    assert np.array_equal(b.signal_proba(X[3:4]), b.signal_proba(X)[3:4])  # row-wise
    assert np.allclose(b.sltp(X), sltp.predict(X))
    trees, cols = b.exit_model
    assert cols.tolist() == [1, 3]
    assert np.allclose(predict_batch(trees, Xp[:20]), pos.booster.predict(Xp[:20]), atol=1e-9)
    assert np.allclose(predict_batch(b.risk_model, Xr[:20]), risk.booster.predict(Xr[:20]), atol=1e-9)
    desc = b.describe()
    assert desc["models"]["signal_rf"]["sha256"] == read_manifest(folder)["models"]["signal_rf"]["sha256"]
    assert desc["loaded"] == {"signal": ["lgb", "rf", "xgb"], "sl_tp": True, "position": True, "risk": True}

    with pytest.raises(ModelError, match="feature mismatch"):
        load_bundle(folder, list(reversed(NAMES)))
    # every listed file is checked before anything loads: a bad optional model stops the bundle too
    (folder / FILES["risk"]).write_bytes(b"garbage")
    with pytest.raises(ModelError, match="risk.zip was modified"):
        load_bundle(folder, NAMES)
    for key in ("risk", "position", "sl_tp"):
        (folder / FILES[key]).unlink(missing_ok=True)
    smaller = {**read_manifest(folder), "models": {k: v for k, v in read_manifest(folder)["models"].items()
                                                   if k in SIGNAL_KEYS}}
    (folder / "manifest.json").write_text(json.dumps(sign_manifest(smaller, signing_key(folder=folder))))
    minimal = load_bundle(folder, NAMES)  # only the signal models: the optional parts are None
    assert minimal.sltp(X) is None and minimal.exit_model is None and minimal.risk_model is None


def test_retrain_signal_script_end_to_end(tmp_root: Path) -> None:
    """The script on a small planted-edge candle file: trains, stages, deploys; a rerun is byte-identical; bad
    input is one line and exit 2 with models/ untouched."""
    from test_models_signal import planted_candles

    data = tmp_root / "candles.parquet"
    planted_candles(9000, seed=1).to_parquet(data)
    params = tmp_root / "params.json"
    params.write_text(json.dumps({"model_params": {
        "rf": {"n_estimators": 20, "max_depth": 5}, "xgb": {"n_estimators": 60, "learning_rate": 0.2},
        "lgb": {"n_estimators": 60, "learning_rate": 0.2, "num_leaves": 7}}}))
    cfg = json.loads((tmp_root / "config.json").read_text())
    cfg["splits"]["oos_weeks"] = 2
    (tmp_root / "config.json").write_text(json.dumps(cfg, indent=2))
    config_before = (tmp_root / "config.json").read_bytes()
    cmd = [sys.executable, str(REPO / "scripts" / "retrain_signal.py"), "--root", str(tmp_root), "--data", str(data),
           "--params", str(params)]

    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "deployed" in first.stdout and "sha256 none ->" in first.stdout
    models = tmp_root / "models"
    assert verify(models, SIGNAL_KEYS).keys() == set(SIGNAL_KEYS)
    assert (tmp_root / "config.json").read_bytes() == config_before
    entry = read_manifest(models)["models"]["signal_xgb"]
    assert entry["params"]["learning_rate"] == 0.2 and entry["metrics"]["val"]["n"] > 0

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("(identical file)") == 3  # same data + seed -> the same bytes

    snapshot = {p.name: p.read_bytes() for p in models.iterdir()}
    params.write_text(json.dumps({"model_params": {"svm": {}}}))
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert {p.name: p.read_bytes() for p in models.iterdir()} == snapshot
