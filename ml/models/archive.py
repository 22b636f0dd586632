"""Model files that cannot run code when loaded: one zip archive per model, holding only inert formats.

Why: a pickle (what joblib writes) is a program; unpickling a tampered file runs whatever it says, as the user, in
the backtest, the weekly job and the live bot. Every model file under ``models/`` (and in staging, the backups and
the registry) is therefore a zip archive (:data:`SUFFIX`) whose members are read by parsers that only build data:

* ``meta.json``: plain JSON (the model type, its classes, clip bounds, feature lists, parameters, seed, info);
* ``*.lgb.txt``: LightGBM model text, parsed by the LightGBM C library (``Booster(model_str=...)``);
* ``*.xgb.ubj``: the XGBoost UBJSON model, parsed by the XGBoost C library (``XGBClassifier.load_model``);
* ``*.skops``: scikit-learn objects (the random forest, the calibrators) in the ``skops`` format, loaded with an
  explicit allow-list (:data:`TRUSTED_SKOPS_TYPES`): skops refuses every type outside its own safe defaults (public
  scikit-learn estimators, numpy arrays, builtins) and our list, so a crafted file cannot name ``os.system``.

What the formats cannot do alone: a crafted but "trusted" scikit-learn tree or booster text can still crash the
process (a C-level out-of-bounds read). That is why :mod:`ml.models.manifest` checks the manifest's HMAC signature
and every file's sha256 *before* this module sees a byte; this module is the second wall, not the first.

Archives are byte-deterministic (fixed member order and timestamps; skops' own zip is rewritten the same way), so
the same model gives the same file and the same sha256 on every save.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.io import jsonable

SUFFIX = ".zip"
ARCHIVE_FORMAT = 1
META = "meta.json"
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: fixed, so archives are byte-deterministic
MAX_MEMBERS = 100_000  # a forest holds a few arrays per tree
MAX_UNPACKED_BYTES = 2 << 30  # 2 GiB: far above any model of ours, far below what would exhaust the machine

# The types a model archive's skops members may hold beyond skops' safe defaults (checked against skops 0.16 and
# scikit-learn 1.9: `skops.io.get_untrusted_types` of our calibrated forest / boosters' calibrators). Each is named
# for a reason: the forest's `Tree` (not trusted by skops since 0.16 because a crafted tree can crash `predict`:
# the signature check above guards that), the calibrator's private per-class holder and its Platt-scaling model.
TRUSTED_SKOPS_TYPES: frozenset[str] = frozenset({
    "sklearn.tree._tree.Tree",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
})


class ArchiveError(UserError):
    """A model archive is malformed, from an unknown format, or holds a type outside the trusted list."""


def _zip(members: Mapping[str, bytes]) -> bytes:
    """A deterministic zip of ``members`` (sorted names, fixed timestamps, deflated)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, members[name], compresslevel=6)
    return buf.getvalue()


def _unzip(data: bytes, what: str) -> dict[str, bytes]:
    """Members of a zip held in memory, with size limits checked from the directory before anything is inflated."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS or sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
                raise ArchiveError(f"{what}: archive too large ({len(infos)} members, "
                                   f"{sum(i.file_size for i in infos)} bytes unpacked): not a model file of ours")
            return {i.filename: zf.read(i) for i in infos}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as exc:
        raise ArchiveError(f"{what}: not a readable model archive ({exc})") from None


def skops_dumps(obj: Any) -> bytes:
    """``skops.io.dumps`` made byte-deterministic: skops stamps its zip members with the current time and names its
    array members and memo ids after ``id()`` / random UUIDs; members are renamed ``000000.npy``, ... in their order
    of appearance in ``schema.json`` (each name is a unique quoted string there), ids renumbered the same way, and
    the whole re-zipped with fixed timestamps."""
    import skops.io as sio

    members = _unzip(sio.dumps(obj), "skops")
    schema = members.pop("schema.json").decode("utf-8")
    order = sorted(members, key=lambda n: (schema.find(f'"{n}"'), n))
    renamed: dict[str, bytes] = {}
    for i, name in enumerate(order):
        new = f"{i:06d}{Path(name).suffix}"
        schema = schema.replace(f'"{name}"', f'"{new}"')
        renamed[new] = members[name]
    ids: dict[str, str] = {}  # skops' memo ids are id() values: renumber them 1, 2, ... (a bijection: same sharing)
    schema = re.sub(r'"__id__": (\d+)', lambda m: f'"__id__": {ids.setdefault(m.group(1), str(len(ids) + 1))}',
                    schema)
    renamed["schema.json"] = schema.encode("utf-8")
    return _zip(renamed)


def untrusted_types(data: bytes) -> list[str]:
    """The types in a skops payload that skops does not trust by default (nothing is loaded)."""
    import skops.io as sio

    try:
        return sorted(sio.get_untrusted_types(data=data))
    except Exception as exc:  # noqa: BLE001 - any parse failure of a foreign payload is "not ours"
        raise ArchiveError(f"unreadable skops payload ({type(exc).__name__}: {exc})") from None


def skops_loads(data: bytes, what: str) -> Any:
    """Load a skops payload, refusing every type outside skops' defaults and :data:`TRUSTED_SKOPS_TYPES`."""
    import skops.io as sio

    found = untrusted_types(data)
    extra = sorted(set(found) - TRUSTED_SKOPS_TYPES)
    if extra:
        raise ArchiveError(f"{what} holds types outside the trusted list: {', '.join(extra[:5])}"
                           f"{' ...' if len(extra) > 5 else ''}: refusing to load it")
    try:
        return sio.loads(data, trusted=found)
    except Exception as exc:  # noqa: BLE001 - a payload that passed the type check but does not construct
        raise ArchiveError(f"{what}: the scikit-learn part does not load ({type(exc).__name__}: {exc})") from None


def check_archive(data: bytes, what: str) -> dict[str, Any]:
    """Check an archive without building any model: readable, ours, and every skops member within the trusted types.
    Returns its meta. (What :func:`ml.models.manifest.sign_set` checks before it signs a set.)"""
    meta, files = unpack(data, what)
    for name, payload in files.items():
        if name.endswith(".skops"):
            extra = sorted(set(untrusted_types(payload)) - TRUSTED_SKOPS_TYPES)
            if extra:
                raise ArchiveError(f"{what} holds types outside the trusted list: {', '.join(extra[:5])}: "
                                   f"refusing it")
    return meta


def pack(meta: Mapping[str, Any], files: Mapping[str, bytes]) -> bytes:
    """One archive from a JSON-able ``meta`` (must hold ``type``) and its binary members."""
    if "type" not in meta:
        raise ValueError("archive meta needs a 'type'")
    if META in files:
        raise ValueError(f"{META} is reserved")
    body = {"archive_format": ARCHIVE_FORMAT, **jsonable(dict(meta))}
    text = json.dumps(body, indent=1, sort_keys=True, allow_nan=False) + "\n"
    return _zip({META: text.encode("utf-8"), **dict(files)})


def unpack(data: bytes, what: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(meta, other members) of an archive; :class:`ArchiveError` when it is not one of ours."""
    members = _unzip(data, what)
    raw = members.pop(META, None)
    if raw is None:
        raise ArchiveError(f"{what}: no {META} in the archive: not a model file of ours")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveError(f"{what}: {META} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("archive_format") != ARCHIVE_FORMAT or "type" not in meta:
        found = meta.get("archive_format") if isinstance(meta, dict) else None
        raise ArchiveError(f"{what}: unknown archive format {found!r} (this code reads format {ARCHIVE_FORMAT})")
    return meta, members


def member(files: Mapping[str, bytes], name: str, what: str) -> bytes:
    """A required member, or :class:`ArchiveError` naming it."""
    if name not in files:
        raise ArchiveError(f"{what}: member {name!r} missing from the archive")
    return files[name]


def lgb_text(booster: Any) -> bytes:
    """A LightGBM booster as its model text (the trees it predicts with: the best iteration when one is set)."""
    return booster.model_to_string().encode("utf-8")


def lgb_from_text(data: bytes, what: str) -> Any:
    """A LightGBM booster parsed from model text (no pickle)."""
    import lightgbm as lgb

    try:
        return lgb.Booster(model_str=data.decode("utf-8"))
    except (UnicodeDecodeError, lgb.basic.LightGBMError, ValueError) as exc:
        raise ArchiveError(f"{what}: the LightGBM model text does not parse ({exc})") from None


# ------------------------------------------------------------------------------------------- one entry point
def encode(obj: Any) -> bytes:
    """The archive bytes of any model we save (signal classifier, position, SL/TP or risk model); ``TypeError`` for
    anything else (nothing is written then)."""
    from ml.models.position import PositionModel
    from ml.models.risk import RiskModel
    from ml.models.signal import encode_classifier
    from ml.models.sltp import SltpModel

    if isinstance(obj, PositionModel | SltpModel | RiskModel):
        meta, files = obj.to_archive()
    else:
        meta, files = encode_classifier(obj)
    data = pack(meta, files)
    check_archive(data, type(obj).__name__)  # never write a file that the loader would refuse
    return data


def decode(data: bytes, what: str) -> Any:
    """The model held by archive bytes (verified by the caller first: see the module docstring)."""
    from ml.models.position import PositionModel
    from ml.models.risk import RiskModel
    from ml.models.signal import CLASSIFIER_TYPES, decode_classifier
    from ml.models.sltp import SltpModel

    meta, files = unpack(data, what)
    kind = meta["type"]
    readers = {"position": PositionModel, "sl_tp": SltpModel, "risk": RiskModel}
    try:
        if kind in readers:
            return readers[kind].from_archive(meta, files, what)
        if kind in CLASSIFIER_TYPES:
            return decode_classifier(meta, files, what)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArchiveError(f"{what}: malformed {kind} archive ({type(exc).__name__}: {exc})") from None
    raise ArchiveError(f"{what}: unknown model type {kind!r} in the archive")
