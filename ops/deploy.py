"""The deployed state (``models/`` + ``config.json``): backups, staging, an atomic journaled switch, recovery.

The invariant
-------------
After a kill at ANY instant (SIGKILL, power loss after the last fsync) followed by :func:`recover`, the pair
``models/`` + ``config.json`` is byte-identical to either the complete OLD set or the complete NEW set, never a mix.
``recover`` must be the first thing every entry point does (under :func:`ops.lock.run_lock`).

Why this way: the live bot loads ``models/`` and ``config.json`` as one unit (the manifest pins the feature list, the
config pins thresholds tuned for exactly those models); a new model with an old threshold is a different, untested
strategy. Two renames cannot be made atomic together, so the switch is recorded in a small journal and recovery
completes or undoes it.

The switch protocol (:func:`commit`, also used by :func:`restore`)
------------------------------------------------------------------
Everything lives in the root (one filesystem, so ``rename`` is atomic); every step fsyncs the files it wrote and
the directories it changed before the next step starts.

1. Preparation (no journal yet: a kill here leaves the deployed state untouched, the leftovers are swept later):
   fsync the staged model files; write the new config to ``config.json.new.<id>``; copy the old config to
   ``config.json.old.<id>`` (needed to roll back after step 4).
2. Journal ``.deploy_journal.json`` (temp file + fsync + ``os.replace`` + fsync dir), state ``prepared``: op, id,
   where the staged models are, whether old/new have models/config, and the sha256 of every file of both sets.
3. ``rename(models, models.old.<id>)`` then ``rename(staged, models)``.
4. ``os.replace(config.json.new.<id>, config.json)``.
5. Journal state ``done``; 6. delete the journal; 7. delete ``models.old.<id>`` and the config copies.

Recovery (:func:`recover`) with a journal present: ``done`` -> finish steps 6-7. ``prepared`` -> if every new part is
present and intact (the staged dir or ``models/`` hashes to the new model hashes, ``config.json.new.<id>`` or
``config.json`` hashes to the new config hash) roll FORWARD by redoing steps 3-7 idempotently (each step looks at what
exists and what it hashes to); otherwise write state ``rolling_back`` (a sticky decision, so a kill during the
rollback cannot flip it) and put the old set back (``models.old.<id>`` -> ``models``, the config copy ->
``config.json``; the new models go back to staging, nothing is deleted that is not a copy). Both directions end by
checking every hash against the journal. Without a journal, leftovers of a switch killed before its journal existed
are swept. Recovery is itself kill-safe: it only uses the same atomic steps, and the journal stays until the end.

A reader (the live bot) can still observe the short window between the two renames of step 3 (``models/`` missing)
or between steps 3 and 4 (new models, old config): readers use :func:`ml.models.bundle.load_deployed`, which reads
config + models together, accepts the pair only when no journal exists and neither changed during the read, and
retries once. The invariant above is about the persistent state.

Crash injection for tests: ``OPS_DEPLOY_CRASH_AT=<point>[#k]`` makes the process SIGKILL itself at that point (see
:data:`CRASH_POINTS`). This is a test hook on a real process, not a mock; production never sets it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import UserError
from core.io import atomic_write_bytes, fsync_dir, fsync_tree, hash_dir, sha256_file, tmp_glob
from core.paths import Paths

if TYPE_CHECKING:
    from ops.hub import Registry

log = logging.getLogger(__name__)

CRASH_ENV = "OPS_DEPLOY_CRASH_AT"
CRASH_POINTS = (
    "backup_copied",  # backup: files copied into the temp dir, not yet renamed to backups/<id>
    "restore_staged",  # restore: backup copied into staging, nothing switched yet
    "before_journal",  # new/old config files written, journal not yet
    "journal_tmp_written",  # the journal's temp file is written but not renamed into place (any journal write)
    "after_journal",  # journal 'prepared' durable, nothing moved
    "after_old_moved",  # models -> models.old.<id>  (models/ missing now)
    "after_new_moved",  # staged -> models
    "after_config",  # config.json.new.<id> -> config.json
    "after_done",  # journal says 'done'
    "after_journal_removed",  # journal deleted, old dir and config copies still there
    "after_cleanup",  # everything removed
    "rollback_decided",  # recovery wrote 'rolling_back'
    "rollback_applied",  # old set back in place, journal still there
    "after_push",  # apply: the registry holds the new version, nothing switched yet
)
JOURNAL_VERSION = 1
CONFIG_KEY = "config.json"
MODELS_PREFIX = "models/"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class DeployError(UserError):
    """The deployed state cannot be switched / recovered / restored as asked: one line, the run must stop."""


# --------------------------------------------------------------------------------------------------- primitives
_crash_hits: dict[str, int] = {}


def _crash_point(name: str) -> None:
    """Test hook: SIGKILL ourselves at ``name`` when ``OPS_DEPLOY_CRASH_AT`` says so (see module docstring).

    ``<point>#<k>`` kills at the k-th time the point is reached (e.g. the second journal write).
    """
    want = os.environ.get(CRASH_ENV)
    if not want:
        return
    target, _, nth = want.partition("#")
    if target != name:
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _models_part(hashes: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in hashes.items() if k.startswith(MODELS_PREFIX)}


def _file_hash(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def _check_run_id(run_id: str) -> None:
    if not _RUN_ID.match(run_id) or ".." in run_id:
        raise DeployError(f"invalid run id {run_id!r}: use letters, digits, '.', '_' and '-' only")


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _set_aside(paths: Paths, path: Path, tag: str) -> Path:
    """Move an unexpected directory out of the way without deleting it (nothing is ever silently lost)."""
    dest = paths.root / f"models.unknown.{tag}.{int(time.time() * 1000)}"
    os.rename(path, dest)
    fsync_dir(paths.root)
    log.warning("moved unexpected %s aside to %s", path, dest)
    return dest


# --------------------------------------------------------------------------------------------------- hashing
def hash_models_dir(directory: Path) -> dict[str, str]:
    """``models/<rel>`` -> sha256 for a staged or deployed models folder, keyed as in :func:`hash_state`."""
    return hash_dir(directory, MODELS_PREFIX)


def hash_state(paths: Paths) -> dict[str, str]:
    """sha256 of the deployed state: ``models/<rel>`` for every file under models/ plus ``config.json``.

    A missing models/ (first deploy) simply contributes no keys; a missing config.json no ``config.json`` key.
    """
    out = hash_dir(paths.models, MODELS_PREFIX)
    if paths.config.is_file():
        out[CONFIG_KEY] = sha256_file(paths.config)
    return dict(sorted(out.items()))


def verify(paths: Paths, expected_hashes: dict[str, str]) -> bool:
    """True when the deployed state is byte-identical to ``expected_hashes`` (same files, same content)."""
    return hash_state(paths) == dict(expected_hashes)


# --------------------------------------------------------------------------------------------------- backups
@dataclass(frozen=True)
class Backup:
    """A complete copy of one deployed state under ``backups/<run_id>/`` (models/, config.json, hashes.json)."""

    run_id: str
    path: Path
    created: str
    hashes: dict[str, str]
    has_models: bool
    has_config: bool

    @property
    def models_dir(self) -> Path:
        return self.path / "models"

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_KEY

    def intact(self) -> bool:
        """The backup's own files still hash to what was recorded when it was taken."""
        got = hash_dir(self.models_dir, MODELS_PREFIX)
        if self.config_file.is_file():
            got[CONFIG_KEY] = sha256_file(self.config_file)
        return dict(sorted(got.items())) == self.hashes and self.models_dir.is_dir() == self.has_models


def load_backup(paths: Paths, run_id: str) -> Backup:
    """Read ``backups/<run_id>/hashes.json``; :class:`DeployError` if there is no such complete backup."""
    d = paths.backups / run_id
    meta_path = d / "hashes.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return Backup(
            run_id=str(meta["run_id"]),
            path=d,
            created=str(meta["created"]),
            hashes=dict(meta["hashes"]),
            has_models=bool(meta["has_models"]),
            has_config=bool(meta["has_config"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DeployError(f"{meta_path}: no readable backup ({type(exc).__name__}: {exc})") from None


def list_backups(paths: Paths) -> list[Backup]:
    """All complete backups, oldest first (by creation time, then id)."""
    if not paths.backups.is_dir():
        return []
    out = []
    for d in paths.backups.iterdir():
        if d.name.startswith(".") or not (d / "hashes.json").is_file():
            continue
        try:
            out.append(load_backup(paths, d.name))
        except DeployError as exc:
            log.warning("ignoring unreadable backup: %s", exc)
    return sorted(out, key=lambda b: (b.created, b.run_id))


def backup(paths: Paths, run_id: str) -> Backup:
    """Copy the deployed models/ + config.json into ``backups/<run_id>/`` with their hashes (temp dir + rename).

    Idempotent per run id: if a complete, intact backup for ``run_id`` already exists it is returned unchanged. A
    resumed run must keep the state from BEFORE the run, not overwrite it with whatever is deployed now.
    """
    _check_run_id(run_id)
    dest = paths.backups / run_id
    if (dest / "hashes.json").is_file():
        existing = load_backup(paths, run_id)
        if not existing.intact():
            raise DeployError(f"backup {dest} exists but its files do not match hashes.json; move it away first")
        log.info("backup %s already exists, keeping it", dest)
        return existing
    paths.backups.mkdir(parents=True, exist_ok=True)
    tmp = paths.backups / f".tmp-{run_id}-{os.getpid()}"
    _rmtree(tmp)
    if dest.exists():  # a directory without hashes.json is not a backup: a leftover of a manual copy
        _rmtree(dest)
    before = hash_state(paths)
    tmp.mkdir()
    has_models = paths.models.is_dir()
    has_config = paths.config.is_file()
    if has_models:
        shutil.copytree(paths.models, tmp / "models", symlinks=False)
    if has_config:
        shutil.copy2(paths.config, tmp / CONFIG_KEY)
    copied = hash_dir(tmp / "models", MODELS_PREFIX)
    if has_config:
        copied[CONFIG_KEY] = sha256_file(tmp / CONFIG_KEY)
    copied = dict(sorted(copied.items()))
    if copied != before:
        _rmtree(tmp)
        raise DeployError("models/ or config.json changed while they were being backed up; nothing was backed up")
    created = datetime.now(UTC).isoformat(timespec="microseconds")
    meta = {"run_id": run_id, "created": created, "has_models": has_models, "has_config": has_config,
            "hashes": copied}
    (tmp / "hashes.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    fsync_tree(tmp)
    _crash_point("backup_copied")
    os.rename(tmp, dest)
    fsync_dir(paths.backups)
    return Backup(run_id, dest, created, copied, has_models, has_config)


def prune_backups(paths: Paths, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` backups (and stale temp dirs); returns the removed run ids.

    Each backup is first renamed to a hidden name (atomic), then deleted, so a kill mid-delete never leaves a
    half-deleted directory that still looks like a backup.
    """
    if keep < 1:
        raise ValueError("keep must be >= 1")
    if not paths.backups.is_dir():
        return []
    for d in paths.backups.iterdir():
        if d.name.startswith((".tmp-", ".trash-")) and not d.name.endswith(f"-{os.getpid()}"):
            _rmtree(d)
    backups = list_backups(paths)
    removed = []
    for b in backups[: max(0, len(backups) - keep)]:
        trash = paths.backups / f".trash-{b.run_id}-{os.getpid()}"
        os.rename(b.path, trash)
        fsync_dir(paths.backups)
        _rmtree(trash)
        removed.append(b.run_id)
    return removed


# --------------------------------------------------------------------------------------------------- staging
def stage_dir(paths: Paths, run_id: str) -> Path:
    """``staging/<run_id>/models``: where trainers write the new models (created, never cleared here)."""
    _check_run_id(run_id)
    d = paths.staging / run_id / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


# --------------------------------------------------------------------------------------------------- journal
@dataclass(frozen=True)
class _Names:
    """The fixed file names of one switch, all inside the root."""

    old_dir: Path
    new_config: Path
    old_config: Path
    staged: Path


def _names(paths: Paths, j: dict[str, Any]) -> _Names:
    rid = j["run_id"]
    staged = Path(j["staged"])
    return _Names(
        old_dir=paths.root / f"models.old.{rid}",
        new_config=paths.root / f"config.json.new.{rid}",
        old_config=paths.root / f"config.json.old.{rid}",
        staged=staged if staged.is_absolute() else paths.root / staged,
    )


def _write_journal(paths: Paths, j: dict[str, Any]) -> None:
    atomic_write_bytes(paths.journal, (json.dumps(j, indent=2, sort_keys=True) + "\n").encode(),
                       before_replace=lambda: _crash_point("journal_tmp_written"))


def _read_journal(paths: Paths) -> dict[str, Any]:
    try:
        j = json.loads(paths.journal.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        # Written with temp + os.replace, so this is damage from outside, not from a kill: do not guess.
        raise DeployError(f"{paths.journal} is unreadable ({exc}); inspect models/ and config.json by hand") from None
    if j.get("version") != JOURNAL_VERSION:
        raise DeployError(f"{paths.journal}: unsupported journal version {j.get('version')!r}")
    return j


# the switch's own files, and the temp files of atomic writes of config.json[.new/.old.<id>] (core.io.tmp_glob)
_LEFTOVER_GLOBS = ("models.old.*", "config.json.new.*", "config.json.old.*", ".config.json.*.tmp.*",
                   tmp_glob("config.json"))


def _sweep_leftovers(paths: Paths) -> list[str]:
    """Without a journal, the files a switch creates before its journal exists (or after deleting it) are garbage."""
    if paths.journal.exists():
        return []
    removed = []
    seen: set[Path] = set()
    for pattern in _LEFTOVER_GLOBS + (tmp_glob(paths.journal.name),):
        for p in paths.root.glob(pattern):
            if p in seen:
                continue
            seen.add(p)
            _rmtree(p)
            removed.append(p.name)
    if removed:
        fsync_dir(paths.root)
    return sorted(removed)


# --------------------------------------------------------------------------------------------------- the switch
def _new_parts_present(paths: Paths, j: dict[str, Any]) -> bool:
    """Every part of the NEW set exists somewhere (in place or where the journal says) with the right hashes."""
    n = _names(paths, j)
    new = j["new"]
    new_models = _models_part(new["hashes"])
    if new["models"]:
        in_place = paths.models.is_dir() and hash_dir(paths.models, MODELS_PREFIX) == new_models
        staged = n.staged.is_dir() and hash_dir(n.staged, MODELS_PREFIX) == new_models
        if not (in_place or staged):
            return False
    if new["config"]:
        want = new["hashes"][CONFIG_KEY]
        if _file_hash(paths.config) != want and _file_hash(n.new_config) != want:
            return False
    return True


def _roll_forward(paths: Paths, j: dict[str, Any]) -> None:
    """Steps 3-7 of the protocol, each one skipped if already done (so it serves both commit and recovery)."""
    n = _names(paths, j)
    root = paths.root
    new = j["new"]
    new_models = _models_part(new["hashes"])
    models = paths.models
    in_place = ((models.is_dir() and hash_dir(models, MODELS_PREFIX) == new_models) if new["models"]
                else not models.exists())

    # 3a. the current models/ (the old set) out of the way
    if not in_place and (models.exists() or models.is_symlink()):
        if n.old_dir.exists():
            _set_aside(paths, models, j["run_id"])  # neither old (already aside) nor new: keep it, but not here
        else:
            os.rename(models, n.old_dir)
            fsync_dir(root)
    _crash_point("after_old_moved")
    # 3b. the staged set in
    if new["models"] and not in_place:
        os.rename(n.staged, models)
        fsync_dir(root)
        fsync_dir(n.staged.parent)
    _crash_point("after_new_moved")
    # 4. the config
    if new["config"]:
        if _file_hash(paths.config) != new["hashes"][CONFIG_KEY]:
            os.replace(n.new_config, paths.config)
            fsync_dir(root)
    elif paths.config.exists():
        paths.config.unlink()
        fsync_dir(root)
    _crash_point("after_config")
    got = hash_state(paths)
    if got != new["hashes"]:
        raise DeployError(
            f"after switching to {j['op']} {j['run_id']} the deployed files do not match the journal "
            f"({_diff(got, new['hashes'])}); journal kept at {paths.journal}"
        )
    if "meta" in j:  # a deploy by apply(): recorded once, also when recovery completes a killed one
        _append_history(paths, {**j["meta"], "run_id": j["run_id"], "hashes": new["hashes"]})
    # 5-7
    j = {**j, "state": "done"}
    _write_journal(paths, j)
    _crash_point("after_done")
    _finish(paths, j)


def _finish(paths: Paths, j: dict[str, Any]) -> None:
    """Steps 6-7: drop the journal, then the old copies (leftovers of a kill here are swept later)."""
    n = _names(paths, j)
    paths.journal.unlink(missing_ok=True)
    fsync_dir(paths.root)
    _crash_point("after_journal_removed")
    _cleanup(paths, n)
    _crash_point("after_cleanup")


def _cleanup(paths: Paths, n: _Names) -> None:
    for p in (n.old_dir, n.new_config, n.old_config):
        _rmtree(p)
    run_stage = n.staged.parent
    # the staged set was renamed into models/: drop its now empty run folder (a set moved back here is kept)
    if run_stage.parent == paths.staging and run_stage.is_dir() and not any(run_stage.iterdir()):
        run_stage.rmdir()
    fsync_dir(paths.root)


def _roll_back(paths: Paths, j: dict[str, Any]) -> None:
    """Put the OLD set back. The decision is written first so that a kill mid-way cannot flip it on the next try."""
    n = _names(paths, j)
    root = paths.root
    old = j["old"]
    models = paths.models
    if j["state"] != "rolling_back":
        j = {**j, "state": "rolling_back"}
        _write_journal(paths, j)
    _crash_point("rollback_decided")

    def _evict_models() -> None:
        # models/ holds the new set (or something unexpected): back to staging so nothing is lost
        if not (models.exists() or models.is_symlink()):
            return
        if n.staged.exists():
            _set_aside(paths, models, j["run_id"])
        else:
            n.staged.parent.mkdir(parents=True, exist_ok=True)
            os.rename(models, n.staged)
            fsync_dir(root)
            fsync_dir(n.staged.parent)

    if old["models"]:
        if n.old_dir.exists():
            _evict_models()
            os.rename(n.old_dir, models)
            fsync_dir(root)
        # else models/ was never moved aside: it still is the old set
    else:
        _evict_models()
    if old["config"]:
        if _file_hash(paths.config) != old["hashes"][CONFIG_KEY]:
            if not n.old_config.is_file():
                raise DeployError(f"cannot roll back config.json: the copy {n.old_config} is missing")
            os.replace(n.old_config, paths.config)
            fsync_dir(root)
    elif paths.config.exists():
        paths.config.unlink()
        fsync_dir(root)
    got = hash_state(paths)
    if got != old["hashes"]:
        raise DeployError(
            f"rolling back {j['op']} {j['run_id']} did not restore the old files ({_diff(got, old['hashes'])}); "
            f"journal kept at {paths.journal}"
        )
    _crash_point("rollback_applied")
    paths.journal.unlink(missing_ok=True)
    fsync_dir(root)
    for p in (n.new_config, n.old_config):
        _rmtree(p)
    fsync_dir(root)


def _diff(got: dict[str, str], want: dict[str, str]) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    changed = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    parts = [f"{label}: {', '.join(v[:3])}{'...' if len(v) > 3 else ''}"
             for label, v in (("missing", missing), ("extra", extra), ("changed", changed)) if v]
    return "; ".join(parts) or "no difference"


def _prepare_staged(paths: Paths, run_id: str, staged_models: Path) -> Path:
    """The staged dir as a path inside the root's filesystem (rename must be atomic); copied there if not."""
    staged = Path(staged_models).resolve()
    if not staged.is_dir():
        raise DeployError(f"staged models {staged} is not a directory")
    if staged == paths.models.resolve():
        raise DeployError("the staged models directory cannot be models/ itself")
    root = paths.root.resolve()
    inside = staged.is_relative_to(root) and os.stat(staged).st_dev == os.stat(root).st_dev
    if inside:
        return staged
    target = paths.staging / run_id / "models"
    tmp = target.with_name(f".tmp-models-{os.getpid()}")
    _rmtree(tmp)
    _rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(staged, tmp, symlinks=False)
    os.rename(tmp, target)
    return target


def _switch(paths: Paths, run_id: str, staged_models: Path | None, new_config: bytes | None, op: str,
            keep_models: bool = False, meta: dict[str, Any] | None = None) -> dict[str, str]:
    """The journaled switch. ``keep_models``: the new set's models are the deployed ones (a config-only change):
    they are recorded in the journal as the new models, found in place, and never moved. ``meta``: what
    :func:`apply` records in the deploy history once the new set is in place (kept in the journal so that a
    recovery that completes the switch records it too)."""
    if paths.journal.exists():
        raise DeployError(f"{paths.journal} exists: an earlier switch was interrupted; call recover() first")
    paths.root.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(paths)
    staged = _prepare_staged(paths, run_id, staged_models) if staged_models is not None else None
    new_hashes: dict[str, str] = {}
    if staged is not None:
        fsync_tree(staged)
        new_hashes.update(hash_dir(staged, MODELS_PREFIX))
    elif keep_models:
        new_hashes.update(hash_dir(paths.models, MODELS_PREFIX))
    if new_config is not None:
        new_hashes[CONFIG_KEY] = hashlib.sha256(new_config).hexdigest()
    new_hashes = dict(sorted(new_hashes.items()))
    old_hashes = hash_state(paths)
    old_has_models = paths.models.is_dir()
    old_has_config = paths.config.is_file()
    root = paths.root.resolve()
    staged_rec = staged if staged is not None else paths.staging / run_id / "models"
    j: dict[str, Any] = {
        "version": JOURNAL_VERSION,
        "op": op,
        "run_id": run_id,
        "state": "prepared",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "staged": staged_rec.resolve().relative_to(root).as_posix() if staged_rec.resolve().is_relative_to(root)
        else str(staged_rec),
        "old": {"models": old_has_models, "config": old_has_config, "hashes": old_hashes},
        "new": {"models": staged is not None or (keep_models and old_has_models), "config": new_config is not None,
                "hashes": new_hashes},
        **({"meta": meta} if meta is not None else {}),
    }
    n = _names(paths, j)
    if new_config is not None:
        atomic_write_bytes(n.new_config, new_config)
    if old_has_config:
        atomic_write_bytes(n.old_config, paths.config.read_bytes())
        # both copies get the deployed file's mode before either is renamed onto config.json: a switch (or its
        # rollback) never changes who may read the config (e.g. 0644 for the bot's user)
        mode = stat.S_IMODE(os.stat(paths.config).st_mode)
        for p in (n.new_config, n.old_config):
            if p.is_file():
                os.chmod(p, mode)
    _crash_point("before_journal")
    _write_journal(paths, j)
    _crash_point("after_journal")
    _roll_forward(paths, j)
    log.info("%s %s deployed (%d files)", op, run_id, len(new_hashes))
    return new_hashes


def commit(paths: Paths, run_id: str, staged_models: Path | None, new_config_text: str | bytes | None
           ) -> dict[str, str]:
    """Make ``staged_models`` + ``new_config_text`` the deployed state, atomically (see the module docstring).

    ``staged_models`` is normally :func:`stage_dir` (a directory elsewhere is first copied there); ``None`` means
    "no models/" and ``new_config_text=None`` "no config.json" (only restoring a pre-first-run backup needs those).
    Returns the new state's hashes. Raises :class:`DeployError` if a journal is pending (call :func:`recover`).
    """
    _check_run_id(run_id)
    data = new_config_text.encode("utf-8") if isinstance(new_config_text, str) else new_config_text
    return _switch(paths, run_id, staged_models, data, "commit")


def recover(paths: Paths) -> str | None:
    """Resolve a switch interrupted by a kill; call first at every start-up (under the run lock).

    Returns a one-line description of what was done, or None when there was nothing to do. Idempotent and kill-safe.
    """
    if not paths.journal.exists():
        swept = _sweep_leftovers(paths)
        return f"removed leftovers of an interrupted switch: {', '.join(swept)}" if swept else None
    j = _read_journal(paths)
    what = f"{j['op']} {j['run_id']}"
    if j["state"] == "done":
        _finish(paths, j)
        msg = f"completed the interrupted {what} (already switched, cleaned up)"
    elif j["state"] == "prepared" and _new_parts_present(paths, j):
        _roll_forward(paths, j)
        msg = f"rolled forward the interrupted {what}: the new models and config are deployed"
    else:
        _roll_back(paths, j)
        msg = f"rolled back the interrupted {what}: the previous models and config are deployed"
    _sweep_leftovers(paths)  # e.g. the temp file of a journal write the kill interrupted
    log.warning("recovered: %s", msg)
    return msg


def restore(paths: Paths, backup: Backup) -> None:
    """Roll back to ``backup``: the same journaled switch, then a hash check against its hashes.json.

    Raises :class:`DeployError` if the backup is damaged (checked before anything changes) or if the deployed state
    does not hash to the backup afterwards.
    """
    if paths.journal.exists():
        raise DeployError(f"{paths.journal} exists: an earlier switch was interrupted; call recover() first")
    if not backup.intact():
        raise DeployError(f"backup {backup.path} is damaged (files do not match hashes.json); nothing restored")
    rid = f"restore-{backup.run_id}"
    _check_run_id(rid)
    staged: Path | None = None
    if backup.has_models:
        run_stage = paths.staging / rid
        _rmtree(run_stage)
        run_stage.mkdir(parents=True)
        tmp = run_stage / ".tmp-models"
        shutil.copytree(backup.models_dir, tmp, symlinks=False)
        staged = run_stage / "models"
        os.rename(tmp, staged)
    _crash_point("restore_staged")
    cfg = backup.config_file.read_bytes() if backup.has_config else None
    _switch(paths, rid, staged, cfg, "restore")
    if not verify(paths, backup.hashes):
        raise DeployError(f"after restoring {backup.path} the deployed files do not match its hashes.json "
                          f"({_diff(hash_state(paths), backup.hashes)})")


# --------------------------------------------------------------------------------------------------- apply
HISTORY = "deploy_history.jsonl"
GIT_FILES = ("config.json", "models/manifest.json")


@dataclass(frozen=True)
class Deployed:
    """What :func:`apply` did: the new state's hashes and one line each for the backup, the registry and git."""

    run_id: str
    hashes: dict[str, str]
    backup: Backup
    registry: str
    git: str


def _scores_text(scores: Mapping[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "none" if v is None else str(v)

    return ", ".join(f"{k} {fmt(v)}" for k, v in scores.items()) or "none"


def message(run_id: str, reason: str, scores: Mapping[str, Any], details: str = "") -> str:
    """The registry / git message of a deploy: the reason as title, then the run id, the scores and the details."""
    return f"{reason}\n\nrun {run_id}; scores: {_scores_text(scores)}" + (f"\n\n{details}" if details else "")


def apply(paths: Paths, run_id: str, staged_models: Path | None, new_config: str | bytes | None, *, reason: str,
          scores: Mapping[str, Any], registry: Registry, details: str = "", git_commit: bool | None = None,
          extra_files: Mapping[str, Path] | None = None, keep_backups: int | None = None) -> Deployed:
    """THE way to change the deployed state (the weekly commit, the retrain scripts, ``sweep --apply``).

    ``staged_models=None`` keeps the deployed models, ``new_config=None`` the deployed config.json (a retrain changes
    only models, a sweep only the config). In this order, each step durable before the next:

    1. a backup of the deployed state under ``backups/<run_id>/`` (idempotent: a resumed run keeps its first one);
    2. a registry version of the NEW set (models/, config.json, manifest.json and ``extra_files``) tagged ``run_id``,
       unless that tag exists already (a resumed run): the registry's history then always holds what is deployed.
       A :class:`ops.hub.HubError` here leaves the deployed state untouched;
    3. the journaled atomic switch (:func:`commit`; :func:`recover` completes or undoes it after a kill);
    4. one line in ``deploy_history.jsonl`` (what was deployed, why, the scores, the registry version), written by
       the switch once the new set is in place, so a switch that recovery completes after a kill is recorded too;
    5. with ``git_commit`` (None = when the root is a git work tree) a git commit of config.json and
       models/manifest.json with the run id and the scores in the message (a failure there is reported, the deploy
       stands: it is already in the registry);
    6. with ``keep_backups``, all but that many newest backups are pruned.

    The caller holds the run lock and has called :func:`recover` (a pending journal is refused).
    """
    _check_run_id(run_id)
    if paths.journal.exists():
        raise DeployError(f"{paths.journal} exists: an earlier switch was interrupted; call recover() first")
    b = backup(paths, run_id)
    config = new_config.encode("utf-8") if isinstance(new_config, str) else new_config
    if config is None and paths.config.is_file():
        config = paths.config.read_bytes()
    models_src = Path(staged_models) if staged_models is not None else paths.models
    text = message(run_id, reason, scores, details)
    if run_id in registry.tags():
        hub = f"tag {run_id} already in {registry.describe()} (resumed commit)"
    else:
        push = paths.staging / f".push-{run_id}"
        _rmtree(push)
        if models_src.is_dir():
            shutil.copytree(models_src, push / "models")
            if (models_src / "manifest.json").is_file():
                shutil.copy2(models_src / "manifest.json", push / "manifest.json")
        push.mkdir(parents=True, exist_ok=True)
        if config is not None:
            (push / CONFIG_KEY).write_bytes(config)
        for name, src in (extra_files or {}).items():
            shutil.copy2(src, push / name)
        try:
            commit_id = registry.push(push, text, run_id)
        finally:
            _rmtree(push)
        hub = f"pushed {commit_id} to {registry.describe()} with tag {run_id}"
    _crash_point("after_push")
    meta = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "reason": reason,
            "scores": json.loads(json.dumps(dict(scores), default=str)), "registry": hub, "backup": str(b.path)}
    hashes = _switch(paths, run_id, staged_models, config, "apply", keep_models=staged_models is None, meta=meta)
    git = record_in_git(paths, text, git_commit)
    if keep_backups is not None:
        prune_backups(paths, keep_backups)
    return Deployed(run_id, hashes, b, hub, git)


def _append_history(paths: Paths, entry: dict[str, Any]) -> None:
    """One JSON line per deploy, appended and fsynced (a torn last line from a kill is skipped by readers); a
    recovery that redoes the step after a kill does not write it twice."""
    if any(h.get("run_id") == entry["run_id"] and h.get("hashes") == entry["hashes"] for h in history(paths)):
        return
    with open(paths.root / HISTORY, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def history(paths: Paths) -> list[dict[str, Any]]:
    """The deploys recorded by :func:`apply`, oldest first."""
    p = paths.root / HISTORY
    out = []
    for line in p.read_text(encoding="utf-8").splitlines() if p.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# --------------------------------------------------------------------------------------------------- git
def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=120, check=False)


def in_git_work_tree(root: Path) -> bool:
    """True when ``root`` lies inside a git work tree (the default of ``pipeline.git_commit``)."""
    try:
        r = _git(root, "rev-parse", "--is-inside-work-tree")
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and r.stdout.strip() == "true"


def record_in_git(paths: Paths, message: str, enabled: bool | None) -> str:
    """Commit config.json and models/manifest.json (only those: other staged changes are left alone) in the git work
    tree holding the root; one line saying what happened. Nothing to commit (already recorded) is not an error."""
    if enabled is False:
        return "off (pipeline.git_commit is false)"
    if not in_git_work_tree(paths.root):
        if enabled:
            log.warning("pipeline.git_commit is on but %s is not a git work tree: nothing committed", paths.root)
        return "off (not a git work tree)"
    files = [f for f in GIT_FILES if (paths.root / f).is_file()]
    ident: list[str] = []
    if not _git(paths.root, "config", "user.email").stdout.strip():
        ident = ["-c", "user.name=weekly-optimizer", "-c", "user.email=weekly-optimizer@localhost"]
    steps = (["add", "-f", "--", *files], [*ident, "commit", "-q", "-m", message, "--only", "--", *files])
    if _git(paths.root, "diff", "--quiet", "HEAD", "--", *files).returncode == 0 and \
            _git(paths.root, "ls-files", "--error-unmatch", "--", *files).returncode == 0:
        return "git: config.json and the manifest are already committed"
    for args in steps:
        r = _git(paths.root, *args)
        if r.returncode != 0:
            err = (r.stderr or r.stdout).strip().splitlines()
            log.warning("git %s failed: %s", args[len(ident)], err[-1] if err else r.returncode)
            return f"git commit failed: {err[-1] if err else r.returncode}"
    sha = _git(paths.root, "rev-parse", "--short", "HEAD").stdout.strip()
    return f"git commit {sha} ({', '.join(files)})"
