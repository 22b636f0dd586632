"""Model files cannot run code, and nothing is decoded before the signed manifest and every file hash check out.

The attacker of these tests can write ``models/`` (or a registry the bot pulls from) and so can rewrite any file and
any sha256 in ``manifest.json``; they do not have the signing key (``<root>/.model_signing_key`` or
``MODEL_SIGNING_KEY``). Exit-code cases run the real ``backtest/run.py`` in a subprocess: one line, exit 2, no
crash, and the payload never runs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import skops.io as sio
from _candles import REAL_BTC, REPO
from _toy_models import toy_models

from backtest.trees import predict_batch
from core.config import config_to_json, default_config
from core.paths import Paths
from market.features import feature_names
from ml.models import archive
from ml.models.bundle import load_bundle, load_deployed
from ml.models.manifest import (
    FILES,
    KEY_FILE,
    ModelError,
    ModelIntegrityError,
    load_model,
    read_manifest,
    save_model,
    sign_manifest,
    sign_set,
    signing_key,
    verify,
)
from ml.models.signal import calibrate_models, ensemble_proba, fit_signal_models, p_long_short

TINY = {"rf": {"n_estimators": 8, "max_depth": 4},
        "xgb": {"n_estimators": 15, "max_depth": 2},
        "lgb": {"n_estimators": 15, "num_leaves": 4, "min_child_samples": 5}}
N_ROWS = 4000  # 2 OOS weeks (1,344 bars) + the feature warm-up: the valid run stays a few seconds


class Evil:
    """Unpickling this creates a directory: the stand-in for ``os.system(...)`` in a tampered model file. The pickle
    names only ``posix.mkdir``, so it would run in any process that unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A root with config.json (2 OOS weeks), a small real candle file and a complete signed set (tiny models on the
    real feature list), plus the in-memory models to compare predictions with."""
    root = tmp_path_factory.mktemp("root")
    cfg = default_config()
    doc = json.loads(config_to_json(cfg))
    doc["splits"]["oos_weeks"] = 2
    (root / "config.json").write_text(json.dumps(doc, indent=2))
    pd.read_csv(REAL_BTC).tail(N_ROWS).to_csv(root / "btc.csv", index=False)
    names = feature_names(cfg)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1500, len(names))).astype(np.float32)
    y = np.digitize(X[:, 0] + 0.5 * rng.standard_normal(1500), [-0.5, 0.5]).astype(np.int64)
    signal = calibrate_models(fit_signal_models(X[:900], y[:900], TINY, seed=1), X[900:], y[900:])
    market = names[:3]
    pos, Xp, risk, Xr, sltp = toy_models(rng, names, market, risk_min=0.5, params={"num_leaves": 4}, seed=1,
                                         info={"rounds": 10, "nan_metric": float("nan")})
    meta = {"train_range": {}, "data_hash": "", "params": {}, "seed": 1, "metrics": {}}
    for k, m in signal.items():
        save_model(root / "models", f"signal_{k}", m, feature_names=names, kind=f"signal_{k}", **meta)
    save_model(root / "models", "position", pos, feature_names=pos.feature_names, kind="position", **meta)
    save_model(root / "models", "sl_tp", sltp, feature_names=names, kind="sl_tp", **meta)
    save_model(root / "models", "risk", risk, feature_names=risk.feature_names, kind="risk", **meta)
    return {"root": root, "names": names, "signal": signal, "pos": pos, "risk": risk, "sltp": sltp,
            "X": X[:200], "Xp": Xp[:50], "Xr": Xr[:50]}


@pytest.fixture
def root(trained: dict, tmp_path: Path) -> Path:
    """A private copy of the trained root (key file included) for a test to tamper with."""
    dst = tmp_path / "root"
    shutil.copytree(trained["root"], dst)
    return dst


def run_cli(root: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "MODEL_SIGNING_KEY"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(REPO / "backtest" / "run.py"), "--root", str(root), "--oos-only",
                           "--data", str(root / "btc.csv"), *extra],
                          capture_output=True, text=True, timeout=300, cwd=root, env=full_env)


def one_line_exit_2(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def _rehash(root: Path, key: str, data: bytes) -> None:
    """What an attacker can do: replace a model file and rewrite its sha256 (and size) in the manifest."""
    models = root / "models"
    (models / FILES[key]).write_bytes(data)
    man = json.loads((models / "manifest.json").read_text())
    man["models"][key].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (models / "manifest.json").write_text(json.dumps(man, indent=2))


# ------------------------------------------------------------------------------------------------ the valid set
def test_signed_set_round_trips_bit_for_bit_and_the_cli_runs(trained: dict, root: Path) -> None:
    names, X = trained["names"], trained["X"]
    b = load_bundle(root / "models", names)
    assert np.array_equal(b.signal_proba(X), p_long_short(ensemble_proba(trained["signal"], X)))
    for k, m in trained["signal"].items():  # each calibrated model alone, bit for bit
        assert np.array_equal(load_model(root / "models", f"signal_{k}", names).predict_proba(X), m.predict_proba(X))
    assert np.array_equal(b.sltp(X), trained["sltp"].predict(X))
    pos = load_model(root / "models", "position", None)
    assert np.array_equal(pos.predict_exit(trained["Xp"]), trained["pos"].predict_exit(trained["Xp"]))
    assert pos.market_features == trained["pos"].market_features and pos.params == {"num_leaves": 4}
    assert pos.info["nan_metric"] is None  # non-finite metadata is stored as null (JSON has no NaN)
    trees, cols = b.exit_model
    assert cols.tolist() == [0, 1, 2]
    assert np.allclose(predict_batch(trees, trained["Xp"]), trained["pos"].booster.predict(trained["Xp"]), atol=1e-12)
    assert np.allclose(predict_batch(b.risk_model, trained["Xr"]), trained["risk"].booster.predict(trained["Xr"]),
                       atol=1e-12)
    risk = load_model(root / "models", "risk", None)
    assert np.array_equal(risk.multiplier(trained["Xr"]), trained["risk"].multiplier(trained["Xr"]))

    # by construction: no model file is a pickle; each is an archive of inert formats
    for key in FILES:
        with zipfile.ZipFile(root / "models" / FILES[key]) as zf:
            members = set(zf.namelist())
        assert "meta.json" in members and not any(m.endswith((".pkl", ".joblib", ".pickle")) for m in members)
    assert {f"{k}": sorted(zipfile.ZipFile(root / "models" / FILES[k]).namelist()) for k in ("signal_xgb",
            "signal_lgb")} == {"signal_xgb": ["calibration.skops", "estimator.xgb.ubj", "meta.json"],
                               "signal_lgb": ["calibration.skops", "estimator.lgb.txt", "meta.json"]}
    key_file = trained["root"] / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not any(p.name == KEY_FILE for p in (root / "models").iterdir())
    assert "/.model_signing_key" in (REPO / ".gitignore").read_text().splitlines()

    r = run_cli(root, "--json", str(root / "out.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((root / "out.json").read_text())["label"] == "OOS"


def test_trusted_types_are_pinned(trained: dict) -> None:
    """The exact types beyond skops' defaults that our files hold: anything else in a file is refused."""
    found = {}
    for k in trained["signal"]:
        with zipfile.ZipFile(trained["root"] / "models" / FILES[f"signal_{k}"]) as zf:
            name = "model.skops" if k == "rf" else "calibration.skops"
            found[k] = sio.get_untrusted_types(data=zf.read(name))
    calib = "sklearn.calibration._SigmoidCalibration"  # 600 calibration samples: sigmoid
    assert found == {"rf": ["sklearn.calibration._CalibratedClassifier", calib, "sklearn.tree._tree.Tree"],
                     "xgb": ["sklearn.calibration._CalibratedClassifier", calib],
                     "lgb": ["sklearn.calibration._CalibratedClassifier", calib]}
    assert set().union(*map(set, found.values())) <= archive.TRUSTED_SKOPS_TYPES


# ------------------------------------------------------------------------------------------------ the attacks
def test_malicious_pickle_never_runs(root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.joblib"
    joblib.dump(Evil(marker), evil)
    payload = evil.read_bytes()

    # 1. the new-format set with a pickle in place of a model file and its sha256 rewritten
    _rehash(root, "signal_rf", payload)
    one_line_exit_2(run_cli(root), "signature does not match")
    assert not marker.exists()

    # 2. what an attacker writes for the old loader: a format-1 manifest over joblib files, hashes all correct
    models = root / "models"
    shutil.rmtree(models)
    models.mkdir()
    table = {}
    for key in FILES:
        name = f"{key}.joblib"
        (models / name).write_bytes(payload)
        table[key] = {"file": name, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload),
                      "feature_names": feature_names(default_config())}
    (models / "manifest.json").write_text(json.dumps({"format": 1, "models": table}))
    one_line_exit_2(run_cli(root), "from before model signing", "never loaded")
    assert not marker.exists()
    with pytest.raises(ModelIntegrityError, match="from before model signing"):
        sign_set(models)  # and it cannot be signed into acceptance either

    joblib.load(evil)  # positive control: the payload does run when unpickled blindly
    assert marker.exists()


def test_flipped_byte_is_exit_2_not_a_crash(root: Path) -> None:
    path = root / "models" / FILES["signal_lgb"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    one_line_exit_2(run_cli(root), "signal_lgb.zip was modified after it was saved")
    _rehash(root, "signal_lgb", bytes(data))  # hash fixed by the attacker: the signature catches it
    one_line_exit_2(run_cli(root), "signature does not match")


def test_forged_manifest_is_refused(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODEL_SIGNING_KEY", raising=False)
    models = root / "models"
    man = json.loads((models / "manifest.json").read_text())
    man["models"]["sl_tp"]["feature_names"] = list(reversed(man["models"]["sl_tp"]["feature_names"]))
    (models / "manifest.json").write_text(json.dumps(man))
    one_line_exit_2(run_cli(root), "signature does not match its content")

    forged = sign_manifest(man, b"k" * 40)  # signed, but with the attacker's key
    (models / "manifest.json").write_text(json.dumps(forged))
    one_line_exit_2(run_cli(root), "signed with another key")
    # MODEL_SIGNING_KEY (the same key on every machine) wins over the key file; a short one is refused
    monkeypatch.setenv("MODEL_SIGNING_KEY", "k" * 40)
    assert set(verify(models)) == set(FILES)
    monkeypatch.setenv("MODEL_SIGNING_KEY", "x" * 40)
    with pytest.raises(ModelIntegrityError, match="signed with another key"):
        verify(models)
    monkeypatch.setenv("MODEL_SIGNING_KEY", "short")
    with pytest.raises(ModelIntegrityError, match="too short"):
        verify(models)
    monkeypatch.delenv("MODEL_SIGNING_KEY")
    del man["signature"]
    (models / "manifest.json").write_text(json.dumps(man))
    one_line_exit_2(run_cli(root), "is not signed", "sign_models.py")


def test_type_outside_the_trusted_list_is_refused(root: Path, trained: dict) -> None:
    """A file that passes the signature (signed on the machine, e.g. by a compromised trainer) but holds a type our
    code never writes: skops refuses it before constructing anything."""
    hostile = archive.pack({"type": "sklearn", "class": "CalibratedClassifierCV"},
                           {"model.skops": sio.dumps({"run": os.system, "arg": "touch pwned"})})
    with zipfile.ZipFile(io.BytesIO(hostile)) as zf:
        assert "posix.system" in archive.untrusted_types(zf.read("model.skops"))
    _rehash(root, "signal_rf", hostile)
    man = json.loads((root / "models" / "manifest.json").read_text())
    (root / "models" / "manifest.json").write_text(json.dumps(sign_manifest(man, signing_key(root))))
    one_line_exit_2(run_cli(root), "outside the trusted list", "posix.system")
    assert not (root / "pwned").exists()
    with pytest.raises(ModelIntegrityError, match="outside the trusted list"):
        sign_set(root / "models")  # the re-sign command refuses it too


# ------------------------------------------------------------------------------------------------ key handling
def test_key_file_must_be_private_and_sign_models_re_signs(root: Path) -> None:
    key_file = root / KEY_FILE
    key_file.chmod(0o644)
    with pytest.raises(ModelIntegrityError, match="readable or writable by others"):
        verify(root / "models")
    key_file.chmod(0o600)
    man = read_manifest(root / "models")
    del man["signature"]
    (root / "models" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ModelIntegrityError, match="is not signed"):
        verify(root / "models")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "sign_models.py"), "--root", str(root)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "signed 6 model files" in r.stdout
    assert set(verify(root / "models")) == set(FILES)
    (root / "models" / FILES["risk"]).write_bytes(b"changed")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "sign_models.py"), "--root", str(root)],
                       capture_output=True, text=True, timeout=120)
    one_line_exit_2(r, "risk.zip was modified")


# ------------------------------------------------------------------------------------------------ readers
def test_load_deployed_reads_one_consistent_pair(root: Path) -> None:
    paths = Paths.of(root)
    d = load_deployed(paths)
    assert d.config.splits.oos_weeks == 2 and set(d.bundle.signal_models) == {"rf", "xgb", "lgb"}
    assert d.config_sha256 == hashlib.sha256(paths.config.read_bytes()).hexdigest()

    # a switch in progress (the deploy journal exists): wait, retry once, then one clear error
    paths.journal.write_text("{}")
    with pytest.raises(ModelError, match="no consistent pair after a retry: a model/config switch is in progress"):
        load_deployed(paths, retry_wait_s=0.05)
    # the switch finishes during the wait: the retry reads the new pair
    timer = threading.Timer(0.1, paths.journal.unlink)
    timer.start()
    d2 = load_deployed(paths, retry_wait_s=1.0)
    timer.join()
    assert d2.manifest_sha256 == d.manifest_sha256
    # integrity failures are not retried: they are not a race
    (root / "models" / FILES["risk"]).write_bytes(b"changed")
    with pytest.raises(ModelIntegrityError, match="risk.zip was modified"):
        load_deployed(paths, retry_wait_s=0.01)


def test_hub_push_refuses_a_folder_holding_the_key(root: Path, tmp_path: Path) -> None:
    from ops.hub import HubError, LocalRegistry

    push = tmp_path / "push"
    shutil.copytree(root / "models", push / "models")
    reg = LocalRegistry(tmp_path / "registry")
    reg.push(push, "ok", "run1")
    shutil.copy2(root / KEY_FILE, push / "models" / KEY_FILE)
    with pytest.raises(HubError, match="signing key"):
        reg.push(push, "leak", "run2")
    assert reg.tags() == ["run1"]


def test_a_backup_copy_verifies_with_its_roots_key(root: Path) -> None:
    """backups/<id>/ holds a config.json copy but never the key: the key is looked up above it (phase 1 loads the
    deployed set from its backup)."""
    backup = root / "backups" / "run1"
    shutil.copytree(root / "models", backup / "models")
    shutil.copy2(root / "config.json", backup / "config.json")
    assert set(verify(backup / "models")) == set(FILES)
    assert not (backup / KEY_FILE).exists()


def test_a_key_in_a_folder_everyone_can_write_is_never_used(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A leftover key in a world-writable folder (``/tmp/.model_signing_key``) is not this root's key: the root gets
    its own; a model folder right under such a folder has no key root (one clear error) unless the environment
    holds the key."""
    monkeypatch.delenv("MODEL_SIGNING_KEY", raising=False)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    stray = shared / KEY_FILE
    stray.write_text("s" * 64)
    stray.chmod(0o600)
    run_root = shared / "run"
    (run_root / "models").mkdir(parents=True)
    (run_root / "config.json").write_text(config_to_json(default_config()))
    key = signing_key(folder=run_root / "models", create=True)
    assert key is not None and key != b"s" * 64
    assert (run_root / KEY_FILE).is_file()
    loose = shared / "models"
    loose.mkdir()
    with pytest.raises(ModelIntegrityError, match="writable by every user"):
        signing_key(folder=loose, create=True)
    monkeypatch.setenv("MODEL_SIGNING_KEY", "e" * 64)
    assert signing_key(folder=loose, create=True) == b"e" * 64
