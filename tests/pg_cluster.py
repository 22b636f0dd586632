"""Test helper: a throwaway PostgreSQL cluster on 127.0.0.1 (free port), made with ``initdb``/``pg_ctl``.

Why a real server and not a mock: the point of the PostgreSQL storage is that several *processes* share one study
through the database's own locking, which only a real server shows.

``initdb`` refuses to run as root. When the tests run as root (CI containers do), every PostgreSQL command runs as an
unprivileged user (``nobody``) through ``runuser``, in a temporary folder that user owns. Authentication is ``trust``
on 127.0.0.1 only; the cluster lives in a temp folder and is stopped (``-m immediate``) and deleted on exit.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "postgres"


class PgUnavailable(RuntimeError):
    """PostgreSQL cannot be started here (binaries missing, or no way to run them unprivileged); tests skip."""


def find_bin(name: str) -> str | None:
    """``name`` on PATH, else in the Debian layout ``/usr/lib/postgresql/<ver>/bin`` (newest version)."""
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts[-3].split(".")])
    return cands[-1] if cands else None


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the start retries on the rare race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    """A running cluster: ``url(db)`` gives the SQLAlchemy URL for Optuna."""

    base: Path
    port: int
    prefix: list[str]
    pg_ctl: str

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg2://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, dbname: str) -> str:
        """``CREATE DATABASE`` (psycopg2, autocommit); returns the database's URL."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{dbname}"')
        finally:
            conn.close()
        return self.url(dbname)

    def log_tail(self, n: int = 30) -> str:
        log = self.base / "server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""

    def stop(self) -> None:
        """Stop immediately (no checkpoint: the data is thrown away) and delete the folder."""
        if self.data_dir.exists():
            subprocess.run([*self.prefix, self.pg_ctl, "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"],
                           cwd=self.base, capture_output=True, timeout=60, check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def _unprivileged_prefix(base: Path) -> list[str]:
    """Command prefix that drops root to ``nobody`` (owning ``base``); empty when not root."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser") or shutil.which("setpriv")
    if runuser is None:
        raise PgUnavailable("running as root and neither runuser nor setpriv is available to run initdb unprivileged")
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        raise PgUnavailable("running as root and there is no 'nobody' user to run initdb as") from None
    os.chown(base, user.pw_uid, user.pw_gid)
    if runuser.endswith("runuser"):
        return [runuser, "-u", "nobody", "--"]
    return [runuser, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]


def start_cluster(attempts: int = 3) -> PgCluster:
    """initdb + pg_ctl start on a free port; raises :class:`PgUnavailable` when PostgreSQL cannot run here."""
    initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise PgUnavailable("PostgreSQL binaries initdb/pg_ctl not found (apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="pgtest-"))
    prefix: list[str] = []
    try:
        prefix = _unprivileged_prefix(base)
        res = subprocess.run([*prefix, initdb, "-D", str(base / "data"), "-U", SUPERUSER, "--auth=trust", "-E",
                              "UTF8", "--no-sync", "--no-instructions"], cwd=base, capture_output=True, text=True,
                             timeout=120, check=False)
        if res.returncode != 0:
            raise PgUnavailable(f"initdb failed: {(res.stderr or res.stdout).strip()[-400:]}")
        last = ""
        for _ in range(attempts):
            port = free_port()
            opts = (f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                    "-c full_page_writes=off -c max_connections=50")
            res = subprocess.run([*prefix, pg_ctl, "-D", str(base / "data"), "-o", opts, "-l",
                                  str(base / "server.log"), "-w", "-t", "60", "start"], cwd=base, capture_output=True,
                                 text=True, timeout=90, check=False)
            if res.returncode == 0:
                cluster = PgCluster(base=base, port=port, prefix=prefix, pg_ctl=pg_ctl)
                _wait_ready(cluster)
                return cluster
            last = (res.stderr or res.stdout).strip()[-400:]
        raise PgUnavailable(f"pg_ctl start failed: {last}")
    except BaseException:
        with contextlib.suppress(Exception):
            if (base / "data" / "postmaster.pid").exists():
                subprocess.run([*prefix, pg_ctl, "-D", str(base / "data"), "-m", "immediate", "stop"], cwd=base,
                               capture_output=True, timeout=30, check=False)
        shutil.rmtree(base, ignore_errors=True)
        raise


def _wait_ready(cluster: PgCluster, timeout_s: float = 30.0) -> None:
    import psycopg2

    t_end = time.monotonic() + timeout_s
    while True:
        try:
            psycopg2.connect(host="127.0.0.1", port=cluster.port, user=SUPERUSER, dbname="postgres").close()
            return
        except psycopg2.OperationalError:
            if time.monotonic() > t_end:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def pg_cluster() -> Iterator[PgCluster]:
    """``with pg_cluster() as pg:`` a running cluster, always stopped and deleted afterwards."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
