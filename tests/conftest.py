"""Shared fixtures, kept small and generic: the shared real-data files, a fresh run root, a byte snapshot of a root.

Module-specific fixtures belong in the test file that uses them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.fail(f"{path} is missing: the tests read ../shared/data beside the repository (never a copy)")
    return path


@pytest.fixture(scope="session")
def real_btc() -> Path:
    """Real BTC/USDT M15 candles (UTC, 2023-2024, one 90-minute halt on 2023-03-24)."""
    return _shared("BTCUSDT_15m_2023_2024.csv")


@pytest.fixture(scope="session")
def mt5_export() -> Path:
    """A real MT5 "Export bars" file (EURUSD M15, tab-separated, CRLF, broker server time, weekdays only)."""
    return _shared("EURUSD_M15_mt5_export.csv")


@pytest.fixture
def tmp_root(tmp_path: Path) -> Path:
    """A fresh run root: config.json with the schema's defaults and an empty data/ folder."""
    from core.config import config_to_json, default_config

    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "config.json").write_text(config_to_json(default_config()), encoding="utf-8")
    return root


def digest_tree(root: Path) -> dict[str, str]:
    """sha256 of config.json and of every file under data/ (relative path -> digest): 'byte-identical' checks."""
    out: dict[str, str] = {}
    files = [root / "config.json", *sorted((root / "data").rglob("*"))]
    for f in files:
        if f.is_file():
            out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture
def snapshot() -> Callable[[Path], dict[str, str]]:
    """``snapshot(root)``: digests of config.json and data/ (compare before/after a run that must write nothing)."""
    return digest_tree
