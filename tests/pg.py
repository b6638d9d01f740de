"""A throw-away PostgreSQL for tests: ``initdb`` into a temporary folder, ``postgres`` on a free
loopback port (its unix socket in that folder too), trust authentication for one test role.

Reuse: ``from pg import PgCluster, pg_binaries`` (tests import from here and conftest). The
``pg_server`` fixture (one cluster per test session) and ``pg_url`` (a fresh database on it
per test) are in conftest. A test that stops and restarts the server makes its own
``PgCluster``. Debian's binaries are in /usr/lib/postgresql/N/bin (``make`` installs them as
root); without them the tests skip, saying so.

As root, initdb and postgres refuse to run: the cluster then belongs to the ``postgres`` user
(Debian's package makes it), or ``nobody``, and runs as that user through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROLE = "streamd"


def pg_binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian layout, or initdb on PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def need_postgres() -> Path:
    bindir = pg_binaries()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed: apt-get install postgresql "
                    "(make does it as root)")
    return bindir


def _run_as() -> str | None:
    """The user the server runs as when this is root (None: this user)."""
    if os.getuid() != 0:
        return None
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
            return user
        except KeyError:
            continue
    pytest.skip("running as root and there is no postgres or nobody user to run PostgreSQL as")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """One PostgreSQL server in its own folder; ``start()``, ``stop()``, ``close()``."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.user = _run_as()
        # Not under pytest's tmp_path: that is private to root (0700), which the postgres user
        # may not enter. A folder of its own in the temporary directory, removed by close().
        self.root = Path(tempfile.mkdtemp(prefix="streamd-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.log = self.root / "server.log"
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        os.chmod(self.root, 0o700)
        self._cmd("initdb", "-D", str(self.data), "-U", ROLE, "--auth=trust", "-E", "UTF8", "--no-sync",
                  "--no-instructions")
        with open(self.data / "postgresql.conf", "a") as fh:
            fh.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.root}'\n"
                     "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")

    @property
    def url(self) -> str:
        return self.url_of("postgres")

    def url_of(self, database: str) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    def _cmd(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [str(self.bindir / tool), *args]
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if r.returncode != 0:
            raise RuntimeError(f"{tool} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r

    def start(self) -> None:
        self._cmd("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clients are disconnected, as an orderly shutdown does; ``immediate``: a crash."""
        self._cmd("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url_of(name)

    def close(self) -> None:
        if self.running():
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def wait_until(check, timeout: float = 10.0, every: float = 0.05):
    """``check()``'s first true value within ``timeout`` seconds, else its last."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)
