"""Model files and their manifest: atomic saves, a signed manifest, integrity and feature checks before any load.

``<folder>/manifest.json`` records, for every model file, what is needed to trust it and to reproduce it: sha256 and
size, kind, library versions, the feature names in order, the training data range and hash, hyperparameters, seed,
validation metrics, creation time (UTC) and code version (git HEAD); and a ``signature``: an HMAC-SHA256 of the
rest of the manifest with this machine's signing key (:func:`signing_key`).

Why files that cannot run code: every model file is an archive of inert formats (:mod:`ml.models.archive`: LightGBM
model text, XGBoost UBJSON, scikit-learn parts in skops with an allow-list of types). Nothing under ``models/``, a
staging folder, a backup or the registry is ever unpickled.

Why a signature as well: whoever can write ``models/`` (or a registry the bot pulls from) can rewrite the sha256 in
the manifest; only the key holder can sign. Crafted "trusted" data (a tree with out-of-range node indices, a
malformed booster text) can still crash a C parser, so the order is fixed: (1) the manifest's signature, (2) the
sha256 of the very bytes that will be decoded and the expected feature list, (3) only then decoding, from those same
bytes in memory (no window in which the file could be swapped between check and load). An unsigned set, a set
signed with another key and a pre-signing set (format 1: pickle files) are refused with one line
(:class:`ModelIntegrityError`, exit 2); ``scripts/sign_models.py`` signs a set of the current format on request.

Why atomic writes: the weekly run may be killed at any point. Each file is written to a temporary name in the same
folder, fsynced and renamed over the old one (``os.replace`` is atomic on POSIX), and the (re-signed) manifest is
updated the same way after the model file, so a crash leaves either the old or the new state, plus at worst an
unreferenced temp file. Writes go to a staging folder seeded with :func:`copy_set`; ``models/`` only changes when
the ops layer commits the staging folder. One writer per folder at a time (the run lock guarantees that).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import hmac
import json
import logging
import os
import platform
import secrets
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.io import atomic_write_bytes, fsync_dir, jsonable

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 1: pickle (joblib) files, unsigned (never loaded any more); 2: archives + signed manifest
FILES: dict[str, str] = {
    "signal_rf": "signal_rf.zip",
    "signal_xgb": "signal_xgb.zip",
    "signal_lgb": "signal_lgb.zip",
    "position": "position.zip",
    "sl_tp": "sl_tp.zip",
    "risk": "risk.zip",
}
KEY_ENV = "MODEL_SIGNING_KEY"
KEY_FILE = ".model_signing_key"  # under the run root, mode 0600, git-ignored, never copied into a model set
MIN_KEY_CHARS = 32
SIGNATURE_ALG = "hmac-sha256"
_SIGN_CONTEXT = b"weekly-optimizer model manifest v2\n"  # domain separation: this key signs nothing else
RESIGN_HINT = "scripts/sign_models.py"
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
    "skops": ("skops",),
}


class ModelError(UserError):
    """A model file or its manifest is missing, modified, or does not match the expected features."""


class ModelIntegrityError(ModelError):
    """The set cannot be trusted: unsigned, wrongly signed, a file changed, or a file holds an untrusted type.

    Distinct from :class:`ModelError` so that callers that may degrade on a missing model (e.g. "no baseline") still
    stop on a set that fails its integrity check: that is a security event, not a missing file."""


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


# ------------------------------------------------------------------------------------------------ signing key
def key_root(folder: str | os.PathLike[str]) -> Path:
    """The run root whose key file signs ``folder``: the nearest ancestor *above* it holding a key file, else (no
    key yet: the first save creates it there) the nearest holding a ``config.json``, else the folder's parent.
    ``models/``, ``staging/<id>/models`` and ``backups/<id>/models`` all lie under their root (a backup folder holds
    a ``config.json`` copy but never the key, hence the key is looked for first). Never the folder itself: whoever
    can write a model folder must not be able to plant a key (and a key file of another user is refused). Never a
    folder every user may write (:func:`_writable_by_all`): a model folder right under ``/tmp`` has no key root
    (:class:`ModelIntegrityError`) unless ``MODEL_SIGNING_KEY`` is set.
    """
    folder = Path(folder).resolve()
    trusted = [anc for anc in folder.parents if not _writable_by_all(anc)]
    for anc in trusted:
        if (anc / KEY_FILE).exists() or (anc / KEY_FILE).is_symlink():
            return anc
    for anc in trusted:
        if (anc / "config.json").is_file():
            return anc
    if folder.parent in trusted:
        return folder.parent
    raise ModelIntegrityError(
        f"{folder}: no run root to keep the model signing key in: {folder.parent} is writable by every user (like "
        f"/tmp); save models under a run root (a folder with config.json) or set {KEY_ENV}")


def _writable_by_all(folder: Path) -> bool:
    """A folder every user may write (``/tmp``): never a key root. A key found there could be anybody's leftover
    (a stray ``/tmp/.model_signing_key`` once made every test root under /tmp sign with it), and a key created there
    would sign for every folder below it."""
    try:
        return bool(folder.stat().st_mode & stat.S_IWOTH)
    except OSError:
        return False


def _key_from_text(text: str, where: str) -> bytes:
    text = text.strip()
    if len(text) < MIN_KEY_CHARS:
        raise ModelIntegrityError(
            f"{where}: the model signing key is too short ({len(text)} characters, need at least {MIN_KEY_CHARS}); "
            f"make one with: python -c 'import secrets; print(secrets.token_hex(32))'")
    return text.encode("utf-8")


def _env_key(root: Path | None) -> bytes | None:
    """MODEL_SIGNING_KEY from the environment, else from ``<root>/.env`` (read, never exported; no root: the
    environment only)."""
    text = os.environ.get(KEY_ENV)
    where = KEY_ENV
    if not text and root is not None and (root / ".env").is_file():
        from dotenv import dotenv_values

        text = dotenv_values(root / ".env").get(KEY_ENV) or None
        where = f"{_show(root / '.env')} {KEY_ENV}"
    return _key_from_text(text, where) if text else None


def _read_key_file(path: Path) -> bytes:
    """The key in ``path`` after checking that it is a private regular file of ours (like ssh does for its keys)."""
    try:
        st = path.lstat()
        if not path.is_file() or path.is_symlink():
            raise ModelIntegrityError(f"{_show(path)}: the model signing key must be a regular file")
        if os.name == "posix":
            if st.st_uid != os.getuid():
                raise ModelIntegrityError(f"{_show(path)}: the model signing key belongs to another user (uid "
                                          f"{st.st_uid}); refusing to use it")
            if st.st_mode & 0o077:
                raise ModelIntegrityError(f"{_show(path)}: the model signing key is readable or writable by others "
                                          f"(mode {st.st_mode & 0o777:o}); run: chmod 600 {_show(path)}")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelIntegrityError(f"{_show(path)}: cannot read the model signing key ({exc})") from None
    return _key_from_text(text, _show(path))


def _create_key_file(path: Path) -> None:
    """A new random key in ``path`` (mode 0600), created atomically; a concurrent creator's key wins, never mixed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # a concurrent creator won: use its key, never overwrite one
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)


def signing_key(root: str | os.PathLike[str] | None = None, *, folder: str | os.PathLike[str] | None = None,
                create: bool = False) -> bytes | None:
    """This machine's model signing key: ``MODEL_SIGNING_KEY`` (environment, then ``<root>/.env``), else the key
    file ``<root>/.model_signing_key``, created on first use (``create=True``: saving) with mode 0600.

    ``root`` defaults to :func:`key_root` of ``folder``. Returns None when there is no key and ``create`` is False
    (nothing can be verified then: every load refuses). Set the same ``MODEL_SIGNING_KEY`` on every machine that
    must load sets signed on another one (the bot pulling from the Hub); the key itself never leaves the machine.
    """
    if root is None:
        if folder is None:
            raise ValueError("signing_key needs a root or a folder")
        try:
            root = key_root(folder)
        except ModelIntegrityError:
            env = _env_key(None)  # the environment's key needs no root
            if env is None:
                raise
            return env
    root = Path(root)
    key = _env_key(root)
    if key is not None:
        return key
    path = root / KEY_FILE
    if not path.exists() and not path.is_symlink():
        if not create:
            return None
        _create_key_file(path)
        log.info("created the model signing key %s (mode 0600; keep it private, never commit or push it)", path)
    return _read_key_file(path)


def key_id(key: bytes) -> str:
    """A short public fingerprint of a key (names the key in messages; reveals nothing about it)."""
    return hashlib.sha256(b"key-id\n" + key).hexdigest()[:16]


def _payload(manifest: Mapping[str, Any]) -> bytes:
    """The signed bytes: the manifest without its signature, as canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(jsonable(body), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def sign_manifest(manifest: dict[str, Any], key: bytes) -> dict[str, Any]:
    """Put the HMAC-SHA256 signature of ``manifest`` (everything but ``signature``) into it; returns it."""
    mac = hmac.new(key, _SIGN_CONTEXT + _payload(manifest), hashlib.sha256).hexdigest()
    manifest["signature"] = {"alg": SIGNATURE_ALG, "key_id": key_id(key), "hmac": mac}
    return manifest


def _is_legacy(manifest: Mapping[str, Any]) -> bool:
    files = [str(e.get("file", "")) for e in manifest.get("models", {}).values() if isinstance(e, dict)]
    return manifest.get("format") != FORMAT_VERSION or any(f.endswith((".joblib", ".pkl", ".pickle")) for f in files)


def check_signature(folder: Path, manifest: Mapping[str, Any], key: bytes | None) -> None:
    """:class:`ModelIntegrityError` unless ``manifest`` is of the current format and signed with ``key``."""
    path = _show(folder / MANIFEST)
    if _is_legacy(manifest):
        raise ModelIntegrityError(
            f"{path}: a set from before model signing (format {manifest.get('format')}: pickle files, unsigned); "
            f"pickles can run code, so it is never loaded: move it aside (mv {_show(folder)} "
            f"{_show(folder)}.legacy) and rebuild it (scripts/weekly_optimize.py, or scripts/retrain_*.py)")
    sig = manifest.get("signature")
    if not isinstance(sig, dict) or not sig.get("hmac"):
        raise ModelIntegrityError(
            f"{path} is not signed: refusing to load the set; if you made these files and trust them, sign them "
            f"with: python {RESIGN_HINT} --models {_show(folder)}")
    if key is None:
        raise ModelIntegrityError(
            f"{path} is signed (key {sig.get('key_id')}) but no signing key is configured here: set {KEY_ENV} "
            f"(environment or .env) to the key the set was signed with")
    if sig.get("alg") != SIGNATURE_ALG:
        raise ModelIntegrityError(f"{path}: unknown signature algorithm {sig.get('alg')!r} (expected "
                                  f"{SIGNATURE_ALG}): refusing to load the set")
    try:
        expected = hmac.new(key, _SIGN_CONTEXT + _payload(manifest), hashlib.sha256).hexdigest()
    except ValueError as exc:  # non-finite numbers cannot be canonical JSON: not a manifest we wrote
        raise ModelIntegrityError(f"{path}: cannot be checked ({exc}): refusing to load the set") from None
    if not hmac.compare_digest(expected, str(sig.get("hmac"))):
        other = sig.get("key_id") != key_id(key)
        why = (f"signed with another key ({sig.get('key_id')}, this machine's is {key_id(key)})" if other else
               "its signature does not match its content (modified after signing)")
        raise ModelIntegrityError(f"{path}: {why}: refusing to load the set; restore it from a backup or retrain")


# ------------------------------------------------------------------------------------------------ manifest
def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed manifest of ``folder`` *without* its signature check (for reports and "what changed" lines; every
    load goes through :func:`read_verified_manifest`); :class:`ModelError` when it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise ModelError(f"{_show(path)} missing: no models have been saved there; run scripts/retrain_signal.py "
                         f"first")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{_show(path)} is not valid JSON ({exc}): restore the models from a backup") from None
    except OSError as exc:
        raise ModelError(f"{_show(path)} cannot be read ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
        raise ModelError(f"{_show(path)} has no 'models' table: not a model manifest")
    return raw


def read_verified_manifest(folder: str | os.PathLike[str], key: bytes | None = None) -> dict[str, Any]:
    """The manifest of ``folder`` after its signature check (``key`` defaults to :func:`signing_key` of the folder).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_signature(folder, manifest, key if key is not None else signing_key(folder=folder))
    for k, e in manifest["models"].items():
        if not isinstance(e, dict) or (k in FILES and e.get("file") != FILES[k]):
            raise ModelIntegrityError(f"{_show(folder / MANIFEST)}: entry {k} does not name {FILES.get(k, k)}")
    return manifest


def _read_or_empty(folder: Path, key: bytes) -> dict[str, Any]:
    """The folder's verified manifest, or an empty one (a new folder): never extend a set we cannot verify."""
    if (folder / MANIFEST).exists():
        return read_verified_manifest(folder, key)
    return {"format": FORMAT_VERSION, "models": {}}


def _write_manifest(folder: Path, manifest: dict[str, Any], key: bytes, *, touch: bool = True) -> None:
    manifest["format"] = FORMAT_VERSION
    if touch:
        manifest["updated_at"] = _utc_now()
    manifest.pop("signature", None)
    manifest = jsonable(manifest)
    sign_manifest(manifest, key)
    text = json.dumps(manifest, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_bytes(folder / MANIFEST, text.encode("utf-8"), mode=FILE_MODE)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def save_model(folder: str | os.PathLike[str], key: str, obj: Any, *, feature_names: Sequence[str],
               train_range: Any, data_hash: str, params: Mapping[str, Any] | None, seed: int,
               metrics: Mapping[str, Any] | None, kind: str, signing: bytes | None = None) -> dict[str, Any]:
    """Write ``obj`` to ``folder/FILES[key]`` atomically (an archive of inert formats), record it in the manifest and
    re-sign it; return the entry. ``signing`` defaults to :func:`signing_key` of the folder (created on first use).

    The model file is replaced first, then the manifest: if the process dies in between, the manifest still holds
    the old hash and :func:`verify` reports the file as modified (never silently loads an unrecorded model). The
    object is encoded before any file is touched, so a model that cannot be saved changes nothing.
    """
    from ml.models.archive import encode

    fname = _check_key(key)
    dest = Path(folder)
    sig_key = signing if signing is not None else signing_key(folder=dest, create=True)
    data = encode(obj)
    manifest = _read_or_empty(dest, sig_key) if dest.exists() else {"format": FORMAT_VERSION, "models": {}}
    dest.mkdir(parents=True, exist_ok=True)
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
    manifest["models"][key] = entry
    _write_manifest(dest, manifest, sig_key)
    return jsonable(entry)


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
    """The file's bytes after the existence, sha256 and feature checks (nothing is decoded here)."""
    fname = _check_key(key)
    path = folder / fname
    if not path.is_file():
        raise ModelError(f"{_show(path)} missing (listed in {MANIFEST}); run scripts/{_PRODUCER[key][1]} or "
                         f"restore the models from a backup")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{_show(path)} cannot be read ({exc})") from None
    actual = hashlib.sha256(data).hexdigest()
    expected = str(entry.get("sha256", ""))
    if actual != expected:
        raise ModelIntegrityError(f"{_show(path)} was modified after it was saved (sha256 {actual[:12]}... != "
                                  f"manifest {expected[:12]}...): refusing to load it; retrain or restore from a "
                                  f"backup")
    if feature_names is not None:
        problem = _feature_problem(key, entry.get("feature_names") or [], feature_names)
        if problem:
            raise ModelError(problem)
    return data


def _entries(folder: Path, keys: Iterable[str] | None, key: bytes | None = None
             ) -> tuple[dict[str, Any], list[str]]:
    manifest = read_verified_manifest(folder, key)
    table: dict[str, Any] = manifest["models"]
    wanted = list(table) if keys is None else list(keys)
    for k in wanted:
        _check_key(k)
        if k not in table:
            raise ModelError(f"{_show(folder / MANIFEST)} has no entry for {k}; run scripts/{_PRODUCER[k][1]} "
                             f"first")
    return table, wanted


def verify(folder: str | os.PathLike[str], keys: Iterable[str] | None = None,
           feature_names: Sequence[str] | None = None, *, signing: bytes | None = None) -> dict[str, Any]:
    """Check the manifest's signature and ``keys`` (default: every file in the manifest) without decoding anything;
    return their entries.

    Raises :class:`ModelIntegrityError` for an unsigned, wrongly signed or pre-signing manifest and a modified file
    (sha256 mismatch), and :class:`ModelError` with a distinct message for: a missing manifest, a key with no entry,
    a missing file and, when ``feature_names`` is given, a feature mismatch (names or order, saying which).
    """
    folder = Path(folder)
    table, wanted = _entries(folder, keys, signing)
    for k in wanted:
        _verified_bytes(folder, k, table[k], feature_names)
    return {k: table[k] for k in wanted}


def decode_verified(data: bytes, what: str) -> Any:
    """Decode archive bytes that passed :func:`verify`'s checks; a decoding problem is a :class:`ModelIntegrityError`
    (e.g. a type outside the trusted list: the set was signed, but is not what our code writes)."""
    from ml.models.archive import ArchiveError, decode

    try:
        return decode(data, what)
    except ArchiveError as exc:
        raise ModelIntegrityError(str(exc)) from None


def load_model(folder: str | os.PathLike[str], key: str, feature_names: Sequence[str] | None, *,
               signing: bytes | None = None) -> Any:
    """Verify the signature and ``key`` (hash, and features unless ``feature_names`` is None), then decode the
    verified bytes."""
    folder = Path(folder)
    table, _ = _entries(folder, [key], signing)
    data = _verified_bytes(folder, key, table[key], feature_names)
    return decode_verified(data, _show(folder / table[key]["file"]))


def require(folder: str | os.PathLike[str], keys: Iterable[str], for_what: str) -> dict[str, Any]:
    """Prerequisite check before training ``for_what``: every key present and intact, else one clear line.

    Example: ``position model needs the signal models: models/signal_rf.zip missing; run
    scripts/retrain_signal.py first``. Returns the verified manifest entries.
    """
    folder = Path(folder)
    keys = list(keys)
    manifest_path = folder / MANIFEST
    manifest = read_manifest(folder) if manifest_path.exists() else {"format": FORMAT_VERSION, "models": {}}
    if _is_legacy(manifest):
        check_signature(folder, manifest, None)  # a pre-signing set: say so, not "file missing"
    table: dict[str, Any] = manifest["models"]
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


def copy_set(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, signing: bytes | None = None) -> list[str]:
    """Make ``dst`` hold exactly the model set of ``src`` (files listed in its manifest + the manifest).

    Seeds a staging folder from the deployed models so that retraining one model keeps the others. Model files in
    ``dst`` that ``src`` lacks are removed (a stale file must not survive into a deploy). A first run (``src``
    has no manifest) leaves ``dst`` empty of models. The source set is verified first, signature included (a
    damaged or tampered deployed file must not travel into the next deploy: :class:`ModelIntegrityError`); files are
    copied byte for byte and re-checked, and the manifest is re-signed for ``dst``. Returns the keys copied.
    """
    src, dst = Path(src), Path(dst)
    table: dict[str, Any] = verify(src, signing=signing) if (src / MANIFEST).exists() else {}
    dst.mkdir(parents=True, exist_ok=True)
    copied: list[str] = []
    for key, fname in FILES.items():
        target = dst / fname
        if key in table:
            # the bytes written are the bytes hash-checked here (a file swapped after verify is never re-signed)
            atomic_write_bytes(target, _verified_bytes(src, key, table[key], None), mode=FILE_MODE)
            copied.append(key)
        else:
            target.unlink(missing_ok=True)
    if table:
        manifest = read_manifest(src)
        manifest["models"] = {k: v for k, v in table.items() if k in copied}
        key = signing if signing is not None else signing_key(folder=dst, create=True)
        _write_manifest(dst, manifest, key, touch=False)
    else:
        (dst / MANIFEST).unlink(missing_ok=True)
    fsync_dir(dst)
    return copied


def sign_set(folder: str | os.PathLike[str], *, signing: bytes | None = None) -> dict[str, Any]:
    """Sign the manifest of ``folder`` with this machine's key, after checking what can be checked without the key.

    For a set of the current format that is unsigned or signed with another key (copied from another machine, a key
    rotated): the person running it vouches for the files. Refused, with nothing changed, for a pre-signing set
    (pickle files are never loaded, so never signed), a file whose sha256 differs from the manifest, and a file
    holding a type outside the trusted list (checked without loading). Returns ``{"key_id", "files"}``.
    """
    from ml.models.archive import ArchiveError, check_archive

    folder = Path(folder)
    manifest = read_manifest(folder)
    if _is_legacy(manifest):
        check_signature(folder, manifest, None)  # raises the pre-signing message
    for k, e in manifest["models"].items():
        _check_key(k)
        if not isinstance(e, dict) or e.get("file") != FILES[k]:
            raise ModelIntegrityError(f"{_show(folder / MANIFEST)}: entry {k} does not name {FILES[k]}")
        data = _verified_bytes(folder, k, e, None)
        try:
            check_archive(data, _show(folder / FILES[k]))
        except ArchiveError as exc:
            raise ModelIntegrityError(str(exc)) from None
    key = signing if signing is not None else signing_key(folder=folder, create=True)
    _write_manifest(folder, manifest, key, touch=False)
    return {"key_id": key_id(key), "files": sorted(manifest["models"])}
