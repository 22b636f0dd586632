"""ops.lock: one run per root, a clear message naming the holder, released by the OS when the holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.errors import EXIT_LOCKED, UserError
from core.paths import Paths
from ops.lock import LockedError, run_lock


def _holder(root: Path) -> subprocess.Popen[str]:
    """A child process that takes the lock, says so, then waits to be killed."""
    code = textwrap.dedent(
        f"""
        import time
        from core.paths import Paths
        from ops.lock import run_lock
        with run_lock(Paths.of({str(root)!r})):
            print("locked", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_holder_in_same_process_is_refused(tmp_path: Path) -> None:
    paths = Paths.of(tmp_path)
    with run_lock(paths):
        assert f"pid={os.getpid()}" in paths.lock.read_text()
        with pytest.raises(LockedError) as info, run_lock(paths):
            pass
    err = info.value
    assert isinstance(err, UserError)
    assert err.exit_code == EXIT_LOCKED == 3
    assert f"pid={os.getpid()}" in str(err)
    assert "\n" not in str(err)
    # released at the end of the block: it can be taken again, and the stale pid is gone
    with run_lock(paths):
        pass
    assert paths.lock.read_text() == ""


def test_other_process_holds_then_sigkill_releases(tmp_path: Path) -> None:
    paths = Paths.of(tmp_path)
    proc = _holder(tmp_path)
    try:
        with pytest.raises(LockedError, match=f"pid={proc.pid}"), run_lock(paths):
            pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    with run_lock(paths):  # the kernel released it with the dead process
        assert f"pid={os.getpid()}" in paths.lock.read_text()


def test_cli_exit_code(tmp_path: Path) -> None:
    """cli_main turns the refusal into one stderr line and exit code 3."""
    proc = _holder(tmp_path)
    code = textwrap.dedent(
        f"""
        from core.errors import cli_main
        from core.paths import Paths
        from ops.lock import run_lock
        def main():
            with run_lock(Paths.of({str(tmp_path)!r})):
                return 0
        cli_main(main)
        """
    )
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert res.returncode == EXIT_LOCKED
    assert res.stderr.startswith("error: another optimizer run holds the lock")
    assert f"pid={proc.pid}" in res.stderr
    assert res.stderr.count("\n") == 1
