"""Shared fixtures, kept small and generic: the shared real-data files, a fresh run root, a byte snapshot of a root.

Module-specific fixtures belong in the test file that uses them.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterator
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


@pytest.fixture
def lock_holder() -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """``lock_holder(root)``: another process holding ``root``'s run lock (started and locked when this returns;
    killed at teardown). It imports the package as any command does: installed, or PYTHONPATH."""
    procs: list[subprocess.Popen[str]] = []

    def start(root: Path) -> subprocess.Popen[str]:
        code = ("import time\nfrom core.paths import Paths\nfrom ops.lock import run_lock\n"
                f"with run_lock(Paths.of({str(root)!r})):\n    print('locked', flush=True)\n    time.sleep(120)\n")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
