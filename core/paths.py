"""Where things live under a run root (``--root``): one place, so several independent roots can coexist."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Paths:
    """All paths of one root. ``config.json``, ``data/``, ``models/``, ``results/``, ``backups/`` live here."""

    root: Path

    @classmethod
    def of(cls, root: str | Path | None = None) -> Paths:
        return cls(Path(root).resolve() if root else REPO_ROOT)

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def backups(self) -> Path:
        return self.root / "backups"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def lock(self) -> Path:
        return self.root / ".weekly_optimize.lock"

    @property
    def journal(self) -> Path:
        return self.root / ".deploy_journal.json"


_PID_TMP = re.compile(r"^\..+\.(\d+)\.tmp$")  # .BTCUSD_M15.parquet.<pid>.tmp (market.data.store.write_store)
_CONFIG_TMP = re.compile(r"^\.config\..+\.tmp$")  # .config.<random>.tmp (a config write in the root)


def remove_stale_temp_files(paths: Paths) -> list[str]:
    """Delete temp files that a write killed mid-way left behind; the names removed (relative to the root).

    Why at start-up: an atomic write is "temp file + rename"; a kill between the two leaves the temp file, which
    nobody will ever rename. Call it only under the root's lock (:mod:`ops.lock`): then no writer of this root is
    running. A store temp file whose writer pid is still alive is left alone all the same (a hand-run tool)."""
    removed: list[str] = []
    for folder, pattern in ((paths.data, _PID_TMP), (paths.root, _CONFIG_TMP)):
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            m = pattern.match(f.name)
            if not m or not f.is_file():
                continue
            if m.groups() and _alive(int(m.group(1))):
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
