"""ops.deploy: SIGKILL at every step of commit / restore / recovery, then recover(): old set or new set, never a mix.

The kills are real: a forked child runs the operation with ``OPS_DEPLOY_CRASH_AT=<point>`` and SIGKILLs itself
there; the parent (a fresh "start-up") runs ``recover`` and compares the bytes on disk.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from core.paths import Paths
from ops.deploy import (
    CRASH_ENV,
    Deployed,
    DeployError,
    apply,
    backup,
    commit,
    hash_state,
    history,
    list_backups,
    load_backup,
    prune_backups,
    record_in_git,
    recover,
    restore,
    stage_dir,
    verify,
)
from ops.hub import LocalRegistry

Snapshot = tuple[dict[str, bytes] | None, bytes | None]

OLD_MODELS = {
    "manifest.json": b'{"version": "old", "files": ["signal.joblib", "sub/x.bin"]}\n',
    "signal.joblib": b"old-signal" * 100,
    "sub/x.bin": b"\x00\x01old-only",
}
OLD_CONFIG = b'{"trading": {"confidence_threshold": 0.5}}\n'
NEW_MODELS = {
    "manifest.json": b'{"version": "new", "files": ["signal.joblib", "position.joblib"]}\n',
    "signal.joblib": b"new-signal" * 120,
    "position.joblib": b"new-position",
}
NEW_CONFIG = '{"trading": {"confidence_threshold": 0.55}}\n'

COMMIT_POINTS = [
    "before_journal", "journal_tmp_written", "after_journal", "after_old_moved", "after_new_moved",
    "after_config", "journal_tmp_written#2", "after_done", "after_journal_removed", "after_cleanup",
]
BEFORE_JOURNAL = {"before_journal", "journal_tmp_written", "restore_staged"}


def _write_tree(d: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _snapshot(paths: Paths) -> Snapshot:
    models = None
    if paths.models.is_dir():
        models = {p.relative_to(paths.models).as_posix(): p.read_bytes()
                  for p in paths.models.rglob("*") if p.is_file()}
    config = paths.config.read_bytes() if paths.config.is_file() else None
    return models, config


def _setup(tmp_path: Path, first_deploy: bool) -> tuple[Paths, Snapshot, Snapshot]:
    """An old deployed state (no models/ on a first deploy) and a staged new one."""
    paths = Paths.of(tmp_path / "root")
    paths.root.mkdir()
    if not first_deploy:
        _write_tree(paths.models, OLD_MODELS)
    paths.config.write_bytes(OLD_CONFIG)
    _write_tree(stage_dir(paths, "run1"), NEW_MODELS)
    old = (None if first_deploy else dict(OLD_MODELS), OLD_CONFIG)
    new = (dict(NEW_MODELS), NEW_CONFIG.encode())
    return paths, old, new


def _child(fn: Callable[[], object], crash_at: str) -> None:
    os.environ[CRASH_ENV] = crash_at
    fn()


def _killed_at(fn: Callable[[], object], crash_at: str) -> None:
    """Run ``fn`` in a forked child that SIGKILLs itself at ``crash_at``; assert it really died there."""
    proc = mp.get_context("fork").Process(target=_child, args=(fn, crash_at))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL, f"child did not die at {crash_at} (exit {proc.exitcode})"


def _assert_clean(paths: Paths) -> None:
    """No journal and no switch leftovers next to the deployed state."""
    assert not paths.journal.exists()
    names = {p.name for p in paths.root.iterdir()}
    assert names <= {"models", "config.json", "staging", "backups"}, names


def _commit(paths: Paths) -> Callable[[], object]:
    return lambda: commit(paths, "run1", paths.staging / "run1" / "models", NEW_CONFIG)


# --------------------------------------------------------------------------------------------------- basics
def test_hash_state_and_verify(tmp_path: Path) -> None:
    paths, _, _ = _setup(tmp_path, first_deploy=False)
    h = hash_state(paths)
    assert set(h) == {"config.json", "models/manifest.json", "models/signal.joblib", "models/sub/x.bin"}
    assert verify(paths, h)
    (paths.models / "sub" / "x.bin").write_bytes(b"tampered")
    assert not verify(paths, h)
    empty = Paths.of(tmp_path / "empty")
    empty.root.mkdir()
    assert hash_state(empty) == {}


@pytest.mark.parametrize("first_deploy", [False, True])
def test_commit_switches_and_cleans_up(tmp_path: Path, first_deploy: bool) -> None:
    paths, old, new = _setup(tmp_path, first_deploy)
    assert _snapshot(paths) == old
    hashes = commit(paths, "run1", paths.staging / "run1" / "models", NEW_CONFIG)
    assert _snapshot(paths) == new
    assert verify(paths, hashes)
    _assert_clean(paths)
    assert not (paths.staging / "run1").exists()
    assert recover(paths) is None


def test_commit_refuses_pending_journal_and_copies_foreign_staging(tmp_path: Path) -> None:
    paths, _, new = _setup(tmp_path, first_deploy=False)
    _killed_at(_commit(paths), "after_old_moved")
    with pytest.raises(DeployError, match="recover"):
        commit(paths, "run2", paths.staging / "run1" / "models", NEW_CONFIG)
    assert recover(paths) is not None
    # a staged dir outside the root is copied into staging/<id>/models first, then switched
    outside = tmp_path / "elsewhere"
    _write_tree(outside, OLD_MODELS)
    commit(paths, "run2", outside, OLD_CONFIG)
    assert _snapshot(paths) == (dict(OLD_MODELS), OLD_CONFIG)
    assert outside.is_dir()  # the caller's folder is left alone
    _assert_clean(paths)


# --------------------------------------------------------------------------------------------------- kill tests
@pytest.mark.parametrize("first_deploy", [False, True], ids=["update", "first"])
@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_kill_during_commit_then_recover(tmp_path: Path, point: str, first_deploy: bool) -> None:
    paths, old, new = _setup(tmp_path, first_deploy)
    _killed_at(_commit(paths), point)
    msg = recover(paths)
    state = _snapshot(paths)
    assert state in (old, new)
    # before the journal exists nothing was switched; once it exists all new parts are there: roll forward
    assert state == (old if point in BEFORE_JOURNAL else new), msg
    _assert_clean(paths)
    assert recover(paths) is None  # idempotent
    # the next run completes
    _write_tree(stage_dir(paths, "run2"), OLD_MODELS)
    commit(paths, "run2", stage_dir(paths, "run2"), OLD_CONFIG)
    assert _snapshot(paths) == (dict(OLD_MODELS), OLD_CONFIG)
    _assert_clean(paths)


@pytest.mark.parametrize("point", ["restore_staged", *COMMIT_POINTS])
def test_kill_during_restore_then_recover(tmp_path: Path, point: str) -> None:
    paths, old, new = _setup(tmp_path, first_deploy=False)
    b = backup(paths, "run1")
    commit(paths, "run1", paths.staging / "run1" / "models", NEW_CONFIG)
    assert _snapshot(paths) == new
    _killed_at(lambda: restore(paths, b), point)
    recover(paths)
    state = _snapshot(paths)
    assert state == (new if point in BEFORE_JOURNAL else old)
    if state == old:
        assert verify(paths, b.hashes)
    _assert_clean(paths)
    restore(paths, b)  # and a restore after recovery works
    assert _snapshot(paths) == old
    _assert_clean(paths)


@pytest.mark.parametrize(
    ("commit_point", "recover_point"),
    [
        ("after_journal", "after_old_moved"),
        ("after_journal", "journal_tmp_written"),  # the 'done' write during recovery
        ("after_old_moved", "after_new_moved"),
        ("after_new_moved", "after_config"),
        ("after_config", "after_done"),
        ("after_done", "after_journal_removed"),
    ],
)
def test_kill_during_recovery_forward(tmp_path: Path, commit_point: str, recover_point: str) -> None:
    paths, old, new = _setup(tmp_path, first_deploy=False)
    _killed_at(_commit(paths), commit_point)
    _killed_at(lambda: recover(paths), recover_point)  # the interrupted recovery leaves a mix: that is fine ...
    recover(paths)  # ... as long as the next recovery makes it whole
    assert _snapshot(paths) == new
    _assert_clean(paths)


@pytest.mark.parametrize("commit_point", ["after_journal", "after_old_moved"])
@pytest.mark.parametrize("recover_points", [[], ["rollback_decided"], ["rollback_decided", "rollback_applied"],
                                            ["rollback_applied"]])
def test_damaged_new_set_rolls_back(tmp_path: Path, commit_point: str, recover_points: list[str]) -> None:
    """A new part that is missing or corrupt once the journal exists (disk trouble, a human) -> back to the old."""
    paths, old, _ = _setup(tmp_path, first_deploy=False)
    _killed_at(_commit(paths), commit_point)
    (paths.staging / "run1" / "models" / "signal.joblib").write_bytes(b"truncated")
    for point in recover_points:
        _killed_at(lambda: recover(paths), point)
    msg = recover(paths)
    assert msg is not None and "rolled back" in msg
    assert _snapshot(paths) == old
    _assert_clean(paths)
    # the (damaged) new set is kept in staging, not deleted
    assert (paths.staging / "run1" / "models" / "position.joblib").is_file()


def test_damaged_new_set_after_first_deploy_switch_rolls_back_to_no_models(tmp_path: Path) -> None:
    paths, old, _ = _setup(tmp_path, first_deploy=True)
    _killed_at(_commit(paths), "after_new_moved")
    (paths.root / "config.json.new.run1").write_bytes(b"garbage")  # the new config is lost
    assert "rolled back" in (recover(paths) or "")
    assert _snapshot(paths) == old
    assert not paths.models.exists()
    _assert_clean(paths)


# --------------------------------------------------------------------------------------------------- backups
def test_backup_contents_idempotence_and_prune(tmp_path: Path) -> None:
    paths, old, _ = _setup(tmp_path, first_deploy=False)
    b = backup(paths, "run1")
    assert b.path == paths.backups / "run1"
    assert b.hashes == hash_state(paths)
    meta = json.loads((b.path / "hashes.json").read_text())
    assert meta["hashes"] == b.hashes and meta["has_models"] and meta["has_config"]
    assert (b.models_dir / "sub" / "x.bin").read_bytes() == OLD_MODELS["sub/x.bin"]
    assert b.intact()
    # a resumed run gets the same backup back even though the deployed state changed meanwhile
    commit(paths, "run1", paths.staging / "run1" / "models", NEW_CONFIG)
    again = backup(paths, "run1")
    assert again.hashes == b.hashes and again.created == b.created
    assert load_backup(paths, "run1") == b
    for i in range(2, 7):
        backup(paths, f"run{i}")
    assert [x.run_id for x in list_backups(paths)] == ["run1", "run2", "run3", "run4", "run5", "run6"]
    removed = prune_backups(paths, keep=3)
    assert removed == ["run1", "run2", "run3"]
    assert [x.run_id for x in list_backups(paths)] == ["run4", "run5", "run6"]
    assert sorted(p.name for p in paths.backups.iterdir()) == ["run4", "run5", "run6"]


def test_backup_kill_leaves_no_half_backup(tmp_path: Path) -> None:
    paths, _, _ = _setup(tmp_path, first_deploy=False)
    _killed_at(lambda: backup(paths, "run1"), "backup_copied")
    assert any(p.name.startswith(".tmp-") for p in paths.backups.iterdir())
    assert list_backups(paths) == []
    assert not (paths.backups / "run1").exists()
    b = backup(paths, "run1")
    assert b.intact()
    prune_backups(paths, keep=5)
    assert sorted(p.name for p in paths.backups.iterdir()) == ["run1"]


def test_restore_first_run_backup_and_damaged_backup(tmp_path: Path) -> None:
    paths, old, new = _setup(tmp_path, first_deploy=True)
    b = backup(paths, "run1")
    assert not b.has_models
    commit(paths, "run1", paths.staging / "run1" / "models", NEW_CONFIG)
    assert _snapshot(paths) == new
    restore(paths, b)
    assert _snapshot(paths) == old and not paths.models.exists()
    _assert_clean(paths)
    # damaged backup: refused before anything changes
    commit(paths, "run2", _staged(paths, "run2", NEW_MODELS), NEW_CONFIG)
    b2 = backup(paths, "run3")
    (b2.models_dir / "signal.joblib").write_bytes(b"bitrot")
    with pytest.raises(DeployError, match="damaged"):
        restore(paths, b2)
    assert _snapshot(paths) == new


def _staged(paths: Paths, run_id: str, files: dict[str, bytes]) -> Path:
    d = stage_dir(paths, run_id)
    _write_tree(d, files)
    return d


# --------------------------------------------------------------------------------------------------- apply
def _registry(paths: Paths) -> LocalRegistry:
    return LocalRegistry(paths.root / "registry")


def _apply_config(paths: Paths, run_id: str = "sweep-1", git_commit: bool | None = False) -> Deployed:
    """A config-only deploy (what ``sweep --apply`` does): the deployed models stay."""
    return apply(paths, run_id, None, NEW_CONFIG, reason="sweep: new trading values", scores={"score": 1.25},
                 registry=_registry(paths), git_commit=git_commit)


def test_apply_config_only_backup_registry_history_and_mode(tmp_path: Path) -> None:
    paths, old, _ = _setup(tmp_path, first_deploy=False)
    os.chmod(paths.config, 0o644)
    before = hash_state(paths)
    done = _apply_config(paths)
    assert _snapshot(paths) == (dict(OLD_MODELS), NEW_CONFIG.encode())
    assert stat.S_IMODE(os.stat(paths.config).st_mode) == 0o644  # the mode of the replaced file is kept
    assert done.hashes == hash_state(paths) and done.git.startswith("off")
    # the backup holds the state before; the registry version holds exactly the state after
    assert load_backup(paths, "sweep-1").hashes == before
    reg = _registry(paths)
    assert reg.tags() == ["sweep-1"]
    got = reg.fetch("sweep-1", tmp_path / "fetched")
    assert (got / "config.json").read_bytes() == NEW_CONFIG.encode()
    assert (got / "models" / "sub" / "x.bin").read_bytes() == OLD_MODELS["sub/x.bin"]
    assert (got / "manifest.json").read_bytes() == OLD_MODELS["manifest.json"]
    assert "run sweep-1; scores: score 1.2500" in reg.commits()[-1]["message"]
    [entry] = history(paths)
    assert entry["run_id"] == "sweep-1" and entry["hashes"] == done.hashes and entry["scores"] == {"score": 1.25}
    assert not paths.journal.exists() and not list(paths.staging.glob(".push-*"))
    # a pending journal is refused: recover first
    _killed_at(lambda: _apply_config(paths, "sweep-2"), "after_journal")
    with pytest.raises(DeployError, match="recover"):
        _apply_config(paths, "sweep-3")


@pytest.mark.parametrize("point", ["after_push", "before_journal", "after_journal", "after_config", "after_done"])
def test_kill_during_config_only_apply(tmp_path: Path, point: str) -> None:
    paths, old, _ = _setup(tmp_path, first_deploy=False)
    os.chmod(paths.config, 0o640)
    _killed_at(lambda: _apply_config(paths), point)
    recover(paths)
    want = old if point in ("after_push", "before_journal") else (dict(OLD_MODELS), NEW_CONFIG.encode())
    assert _snapshot(paths) == want
    assert stat.S_IMODE(os.stat(paths.config).st_mode) == 0o640
    assert "sweep-1" in _registry(paths).tags()  # the registry got the version before anything switched


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout


def test_git_commit_on_deploy_nothing_on_rollback(tmp_path: Path) -> None:
    paths, old, new = _setup(tmp_path, first_deploy=False)
    _git(paths.root, "init", "-q")
    _git(paths.root, "-c", "user.name=t", "-c", "user.email=t@t", "add", "config.json")
    _git(paths.root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "initial")
    (paths.root / "notes.txt").write_text("the user's own staged work\n")
    _git(paths.root, "add", "notes.txt")
    done = apply(paths, "run1", paths.staging / "run1" / "models", NEW_CONFIG, reason="weekly run1: score 0.9000",
                 scores={"score": 0.9, "baseline": 0.5}, registry=_registry(paths), git_commit=None)
    assert _snapshot(paths) == new and done.git.startswith("git commit ")
    head = _git(paths.root, "log", "-1", "--format=%B")
    assert head.startswith("weekly run1: score 0.9000") and "run run1" in head and "baseline 0.5000" in head
    assert _git(paths.root, "show", "HEAD:config.json").encode() == NEW_CONFIG.encode()
    assert _git(paths.root, "show", "HEAD:models/manifest.json").encode() == NEW_MODELS["manifest.json"]
    assert sorted(_git(paths.root, "show", "--name-only", "--format=", "HEAD").split()) == \
        ["config.json", "models/manifest.json"]  # the user's staged file is not swept into the commit
    assert "notes.txt" in _git(paths.root, "diff", "--cached", "--name-only")
    n_commits = _git(paths.root, "rev-list", "--count", "HEAD")
    restore(paths, load_backup(paths, "run1"))  # a rollback commits nothing
    assert _snapshot(paths) == old
    assert _git(paths.root, "rev-list", "--count", "HEAD") == n_commits
    # switched off, or a root outside any work tree: no commit, said so
    assert record_in_git(paths, "x", False).startswith("off")
    (tmp_path / "plain").mkdir()
    outside, _, _ = _setup(tmp_path / "plain", first_deploy=False)
    assert record_in_git(outside, "x", None) == "off (not a git work tree)"
