"""Model files and their manifest: atomic saves, integrity and feature checks before anything is unpickled.

``<folder>/manifest.json`` records, for every model file, what is needed to trust it and to reproduce it: sha256 and
size, kind, library versions, the feature names in order, the training data range and hash, hyperparameters, seed,
validation metrics, creation time (UTC) and code version (git HEAD).

Why verify before loading: a joblib file is a pickle, and unpickling runs code. Files may come from elsewhere (the
Hub, a backup, a copied folder), so :func:`load_model` reads the bytes once, checks their sha256 against the
manifest and the expected feature list against the recorded one, and only then unpickles *those same bytes* (no
window in which the file could be swapped between check and load). A model never runs on the wrong columns.

Why atomic writes: the weekly run may be killed at any point. Each file is written to a temporary name in the same
folder, fsynced and renamed over the old one (``os.replace`` is atomic on POSIX), and the manifest is updated the
same way after the model file, so a crash leaves either the old or the new state, plus at worst an unreferenced
temp file. Writes go to a staging folder seeded with :func:`copy_set`; ``models/`` only changes when the ops layer
commits the staging folder. One writer per folder at a time (the run lock guarantees that).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.io import atomic_write_bytes, copy_file_atomic, fsync_dir

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FILES: dict[str, str] = {
    "signal_rf": "signal_rf.joblib",
    "signal_xgb": "signal_xgb.joblib",
    "signal_lgb": "signal_lgb.joblib",
    "position": "position.joblib",
    "sl_tp": "sl_tp.joblib",
    "risk": "risk.joblib",
}
SIGNAL_KEYS = ("signal_rf", "signal_xgb", "signal_lgb")
FILE_MODE = 0o644  # model files and manifest: readable by the bot, which may run as another user
# which script (re)creates a key, and how to name the group in a prerequisite message
_PRODUCER = {
    "signal_rf": ("the signal models", "retrain_signal.py"),
    "signal_xgb": ("the signal models", "retrain_signal.py"),
    "signal_lgb": ("the signal models", "retrain_signal.py"),
    "position": ("the position model", "retrain_position.py"),
    "sl_tp": ("the SL/TP model", "retrain_sltp.py"),
    "risk": ("the risk model", "retrain_risk.py"),
}
_LIBS = {
    "sklearn": ("scikit-learn",),
    "xgboost": ("xgboost", "xgboost-cpu"),
    "lightgbm": ("lightgbm",),
    "numpy": ("numpy",),
    "joblib": ("joblib",),
}


class ModelError(UserError):
    """A model file or its manifest is missing, modified, or does not match the expected features."""


# ------------------------------------------------------------------------------------------------ helpers
def _show(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _check_key(key: str) -> str:
    if key not in FILES:
        raise ModelError(f"unknown model key {key!r}; known keys: {', '.join(FILES)}")
    return FILES[key]


def library_versions() -> dict[str, str]:
    """Versions of the libraries a pickle depends on (read from package metadata: no heavy imports)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {"python": platform.python_version()}
    for name, dists in _LIBS.items():
        out[name] = "missing"
        for dist in dists:
            try:
                out[name] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out


def code_version() -> str:
    """``git rev-parse HEAD`` of the repository holding this code, or "unknown" (e.g. an installed copy)."""
    repo = Path(__file__).resolve().parents[2]
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and sha else "unknown"


def _jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, paths, timestamps and tuples (manifest values come from ML code)."""
    import numpy as np

    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    return str(obj)


# ------------------------------------------------------------------------------------------------ manifest
def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed manifest of ``folder``; :class:`ModelError` when it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise ModelError(f"{_show(path)} missing: no models have been saved there; run scripts/retrain_signal.py "
                         f"first")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{_show(path)} is not valid JSON ({exc}): restore the models from a backup") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
        raise ModelError(f"{_show(path)} has no 'models' table: not a model manifest")
    return raw


def _read_or_empty(folder: Path) -> dict[str, Any]:
    if (folder / MANIFEST).exists():
        return read_manifest(folder)
    return {"format": FORMAT_VERSION, "models": {}}


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    manifest["format"] = FORMAT_VERSION
    manifest["updated_at"] = _utc_now()
    text = json.dumps(_jsonable(manifest), indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(folder / MANIFEST, text.encode("utf-8"), mode=FILE_MODE)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def save_model(folder: str | os.PathLike[str], key: str, obj: Any, *, feature_names: Sequence[str],
               train_range: Any, data_hash: str, params: Mapping[str, Any] | None, seed: int,
               metrics: Mapping[str, Any] | None, kind: str) -> dict[str, Any]:
    """Dump ``obj`` to ``folder/FILES[key]`` atomically and record it in ``folder/manifest.json``; return the entry.

    The model file is replaced first, then the manifest: if the process dies in between, the manifest still holds
    the old hash and :func:`verify` reports the file as modified (never silently loads an unrecorded model).
    """
    import joblib

    fname = _check_key(key)
    dest = Path(folder)
    dest.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    joblib.dump(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(dest / fname, data, mode=FILE_MODE)
    entry = {
        "file": fname,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "kind": kind,
        "class": f"{type(obj).__module__}.{type(obj).__qualname__}",
        "versions": library_versions(),
        "feature_names": list(feature_names),
        "train_range": train_range,
        "data_hash": data_hash,
        "params": params or {},
        "seed": int(seed),
        "metrics": metrics or {},
        "created_at": _utc_now(),
        "code_version": code_version(),
    }
    manifest = _read_or_empty(dest)
    manifest["models"][key] = entry
    _write_manifest(dest, manifest)
    return _jsonable(entry)


def _feature_problem(key: str, recorded: Sequence[str], expected: Sequence[str]) -> str | None:
    """None when equal, else a one-line description that says whether names or only the order differ."""
    rec, exp = list(recorded), list(expected)
    if rec == exp:
        return None
    missing = [f for f in exp if f not in rec]
    extra = [f for f in rec if f not in exp]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"expected but not trained on {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"trained on but not supplied {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        return (f"feature mismatch for {key}: names differ ({len(rec)} trained vs {len(exp)} supplied; "
                f"{'; '.join(parts)}): retrain the model for the current features")
    if len(rec) != len(exp):
        return f"feature mismatch for {key}: {len(rec)} trained vs {len(exp)} supplied columns (duplicates)"
    pos = next(i for i, (a, b) in enumerate(zip(rec, exp, strict=True)) if a != b)
    return (f"feature mismatch for {key}: same names in a different order (first difference at column {pos}: "
            f"trained {rec[pos]!r}, supplied {exp[pos]!r}): the model would read the wrong columns")


def _verified_bytes(folder: Path, key: str, entry: Mapping[str, Any],
                    feature_names: Sequence[str] | None) -> bytes:
    """The file's bytes after the existence, sha256 and feature checks (nothing is unpickled here)."""
    fname = _check_key(key)
    path = folder / fname
    if not path.is_file():
        raise ModelError(f"{_show(path)} missing (listed in {MANIFEST}); run scripts/{_PRODUCER[key][1]} or "
                         f"restore the models from a backup")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    expected = str(entry.get("sha256", ""))
    if actual != expected:
        raise ModelError(f"{_show(path)} was modified after it was saved (sha256 {actual[:12]}... != manifest "
                         f"{expected[:12]}...): refusing to load it; retrain or restore from a backup")
    if feature_names is not None:
        problem = _feature_problem(key, entry.get("feature_names") or [], feature_names)
        if problem:
            raise ModelError(problem)
    return data


def _entries(folder: Path, keys: Iterable[str] | None) -> tuple[dict[str, Any], list[str]]:
    manifest = read_manifest(folder)
    table: dict[str, Any] = manifest["models"]
    wanted = list(table) if keys is None else list(keys)
    for key in wanted:
        _check_key(key)
        if key not in table:
            raise ModelError(f"{_show(folder / MANIFEST)} has no entry for {key}; run scripts/{_PRODUCER[key][1]} "
                             f"first")
    return table, wanted


def verify(folder: str | os.PathLike[str], keys: Iterable[str] | None = None,
           feature_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Check ``keys`` (default: every file in the manifest) without unpickling anything; return their entries.

    Raises :class:`ModelError` with a distinct message for: a missing manifest, a key with no entry, a missing
    file, a modified file (sha256 mismatch) and, when ``feature_names`` is given, a feature mismatch (names or
    order, saying which).
    """
    folder = Path(folder)
    table, wanted = _entries(folder, keys)
    for key in wanted:
        _verified_bytes(folder, key, table[key], feature_names)
    return {k: table[k] for k in wanted}


def load_model(folder: str | os.PathLike[str], key: str, feature_names: Sequence[str] | None) -> Any:
    """Verify ``key`` (hash, and features unless ``feature_names`` is None) and unpickle the verified bytes."""
    import joblib

    folder = Path(folder)
    table, _ = _entries(folder, [key])
    data = _verified_bytes(folder, key, table[key], feature_names)
    return joblib.load(io.BytesIO(data))


def require(folder: str | os.PathLike[str], keys: Iterable[str], for_what: str) -> dict[str, Any]:
    """Prerequisite check before training ``for_what``: every key present and intact, else one clear line.

    Example: ``position model needs the signal models: models/signal_rf.joblib missing; run
    scripts/retrain_signal.py first``. Returns the verified manifest entries.
    """
    folder = Path(folder)
    keys = list(keys)
    manifest_path = folder / MANIFEST
    table: dict[str, Any] = read_manifest(folder)["models"] if manifest_path.exists() else {}
    for key in keys:
        fname = _check_key(key)
        group, script = _PRODUCER[key]
        path = folder / fname
        if not path.is_file():
            raise ModelError(f"{for_what} needs {group}: {_show(path)} missing; run scripts/{script} first")
        if key not in table:
            raise ModelError(f"{for_what} needs {group}: {_show(path)} is not recorded in "
                             f"{_show(manifest_path)}; run scripts/{script} first")
    return verify(folder, keys)


def copy_set(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[str]:
    """Make ``dst`` hold exactly the model set of ``src`` (files listed in its manifest + the manifest).

    Seeds a staging folder from the deployed models so that retraining one model keeps the others. Model files in
    ``dst`` that ``src`` lacks are removed (a stale file must not survive into a deploy). A first run (``src``
    has no manifest) leaves ``dst`` empty of models. The source set is verified first (a damaged or tampered
    deployed file must not travel into the next deploy: :class:`ModelError`); files are copied byte for byte, so
    the hashes stay valid. Returns the keys copied.
    """
    src, dst = Path(src), Path(dst)
    table: dict[str, Any] = verify(src) if (src / MANIFEST).exists() else {}
    dst.mkdir(parents=True, exist_ok=True)
    copied: list[str] = []
    for key, fname in FILES.items():
        target = dst / fname
        if key in table:
            copy_file_atomic(src / fname, target)
            copied.append(key)
        else:
            target.unlink(missing_ok=True)
    if table:
        kept = {k: v for k, v in table.items() if k in copied}
        manifest = read_manifest(src)
        manifest["models"] = kept
        text = json.dumps(manifest, indent=2) + "\n"
        atomic_write_bytes(dst / MANIFEST, text.encode("utf-8"), mode=FILE_MODE)
    else:
        (dst / MANIFEST).unlink(missing_ok=True)
    fsync_dir(dst)
    return copied


