"""The repository's scripts: `bash scripts/demo.sh` leaves the repository as it was (its own git-ignored root with
its own copy of config.json; a root's lock file is ignored by git), and `scripts/test.sh` does not hide a skipped
PostgreSQL test (package lists updated before the install; CI fails instead of skipping)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_demo_root_and_lock_file_are_ignored_by_git() -> None:
    r = subprocess.run(["git", "check-ignore", "--no-index", ".demo/config.json", ".demo/models/manifest.json",
                        ".weekly_optimize.lock", ".demo/.weekly_optimize.lock"], cwd=REPO, capture_output=True,
                       text=True)
    assert r.stdout.split() == [".demo/config.json", ".demo/models/manifest.json", ".weekly_optimize.lock",
                                ".demo/.weekly_optimize.lock"], r.stdout + r.stderr
    assert "ROOT=\"${DEMO_ROOT:-.demo}\"" in (REPO / "scripts" / "demo.sh").read_text()


def test_demo_runs_in_its_own_root_with_its_own_config(tmp_path: Path) -> None:
    shipped = _sha(REPO / "config.json")
    demo_root = tmp_path / "demo"
    env = {**os.environ, "DEMO_ROOT": str(demo_root), "DEMO_PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--phases", "1"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"demo root: {demo_root}" in r.stdout
    assert _sha(demo_root / "config.json") == shipped  # a copy, which the demo's commits may change
    assert list((demo_root / "results").glob("*/report.md"))
    assert (demo_root / ".weekly_optimize.lock").exists()
    assert _sha(REPO / "config.json") == shipped


def test_test_script_updates_package_lists_before_installing_postgres() -> None:
    """On a fresh machine `apt-get install` without `apt-get update` fails quietly and the PostgreSQL test skips:
    the lists are updated first, and a failed install is said on stderr (static check of scripts/test.sh)."""
    text = (REPO / "scripts" / "test.sh").read_text()
    update, install = text.find("apt-get update"), text.find("apt-get install")
    assert 0 <= update < install, "apt-get update must come before apt-get install"
    assert "|| true" not in text.split("apt-get install", 1)[1].split("\n", 1)[0], "a failed install is not hidden"
    assert "SKIPPED" in text
    assert "REQUIRE_POSTGRES=1" in (REPO / ".ci" / "run").read_text()


def test_missing_postgres_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_tune_postgres import postgres_required

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("REQUIRE_POSTGRES", raising=False)
    assert not postgres_required()
    monkeypatch.setenv("CI", "true")
    assert postgres_required()
    monkeypatch.delenv("CI")
    monkeypatch.setenv("REQUIRE_POSTGRES", "1")
    assert postgres_required()
