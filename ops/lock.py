"""One optimizer run at a time per root: an OS advisory lock on ``paths.lock``.

Why an OS lock (``fcntl.flock``) and not a "pid file exists" check: the kernel drops the lock when the holding
process dies for any reason, SIGKILL and power loss included, so a crashed run never leaves a stale lock that a
human must delete, and there is no race between "check" and "create". The pid written into the file is only
informational (it names the holder in the error message); the lock itself is the ``flock``.

Notes:
- The lock belongs to the open file description. Processes forked while it is held (multiprocessing "fork"
  workers) inherit it, so the lock is only released when the last of them exits: a worker still writing under the
  root keeps other runs out, which is what we want.
- Taking the lock twice in the same process (two ``run_lock`` blocks) also fails with :class:`LockedError`: each
  ``open`` is a separate description, and nested runs in one process are a bug as well.
- The lock file is never deleted: deleting it would let a newcomer lock a fresh inode while the holder still holds
  the old one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from core.errors import EXIT_LOCKED, UserError
from core.paths import Paths


class LockedError(UserError):
    """Another run holds the lock of this root: exit at once with :data:`core.errors.EXIT_LOCKED`."""

    exit_code = EXIT_LOCKED


def _read_holder(fd: int) -> str:
    """Best-effort description of the holder from the lock file's content (``pid=... started=...``)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 512).decode("utf-8", "replace").strip()
    except OSError:
        return "pid unknown"
    return text or "pid unknown"


@contextmanager
def run_lock(paths: Paths, lock_path: Path | None = None, holder: str = "optimizer run") -> Iterator[int]:
    """Hold the root's run lock for the ``with`` block; yields the fd (for tests / diagnostics). ``lock_path`` /
    ``holder`` give another lock of the same kind (the live bot: one instance per account).

    Raises :class:`LockedError` immediately (non-blocking) if another process holds it: a cron job that overlaps a
    long manual run must not queue up behind it.
    """
    lock_path = Path(lock_path) if lock_path is not None else paths.lock
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            who = _read_holder(fd)
            raise LockedError(
                f"another {holder} holds the lock {lock_path} ({who}); "
                "wait for it to finish (the lock is released automatically when that process exits)"
            ) from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.write(fd, f"pid={os.getpid()} started={started}\n".encode())
        os.fsync(fd)
        try:
            yield fd
        finally:
            # Clear the informational content first so a later reader never names a finished process.
            with suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
