"""Where things live under a run root (``--root``): one place, so several independent roots can coexist."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from core.io import parse_tmp_name

REPO_ROOT = Path(__file__).resolve().parent.parent


def _under(name: str) -> property:
    """A read-only attribute ``root / name`` of :class:`Paths` (the layout is data: a table, not nine getters)."""

    def get(self: Paths) -> Path:
        return self.root / name

    return property(get, doc=f"``<root>/{name}``")


@dataclass(frozen=True)
class Paths:
    """All paths of one root. ``config.json``, ``data/``, ``models/``, ``results/``, ``backups/`` live here."""

    root: Path

    @classmethod
    def of(cls, root: str | Path | None = None) -> Paths:
        return cls(Path(root).resolve() if root else REPO_ROOT)

    # the layout as one table: each name is a path below the root
    config = _under("config.json")
    data = _under("data")
    models = _under("models")
    results = _under("results")
    backups = _under("backups")
    staging = _under("staging")
    registry = _under("registry")
    lock = _under(".weekly_optimize.lock")
    journal = _under(".deploy_journal.json")


def remove_stale_temp_files(paths: Paths) -> list[str]:
    """Delete temp files that a write killed mid-way left behind; the names removed (relative to the root).

    Why at start-up: an atomic write (:func:`core.io.atomic_write`) is "temp file + rename"; a kill between the two
    leaves the temp file, which nobody will ever rename. Call it only under the root's lock (:mod:`ops.lock`): then
    no writer of this root is running. A temp file whose writer pid is still alive is left alone all the same (a
    hand-run tool). Looked at: ``data/`` (the store) and the root's ``config.json`` writes."""
    removed: list[str] = []
    for folder, targets in ((paths.data, None), (paths.root, {"config.json"})):
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            parsed = parse_tmp_name(f.name)
            if parsed is None or not f.is_file() or (targets is not None and parsed[0] not in targets):
                continue
            if _alive(parsed[1]):
                continue
            with contextlib.suppress(OSError):
                f.unlink()
                removed.append(f.relative_to(paths.root).as_posix())
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own earlier write cannot still be in progress: we are here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's process) or cannot be told: keep its file
    return True
