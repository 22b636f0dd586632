"""Where things live under a run root (``--root``): one place, so several independent roots can coexist."""

from __future__ import annotations

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
