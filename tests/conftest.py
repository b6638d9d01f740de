"""Shared helpers: run the real CLI in subprocesses, free ports, a systemd notify socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamd import keys

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
MODELS = ROOT / "models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def streamd(*args: str, **kw) -> subprocess.CompletedProcess:
    """Run the CLI to completion."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return subprocess.run([sys.executable, "-m", "streamd", *args], cwd=ROOT, **kw)


def start_streamd(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "streamd", *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class Isolated:
    """--set options that give one daemon its own state dir, endpoint and metrics port."""

    def __init__(self, tmp: Path):
        self.state = tmp / "state"
        self.events_port = free_port()
        self.metrics_port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.events_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def sets(self, *extra: str) -> list[str]:
        out = []
        for kv in (f'state.dir="{self.state}"', f'events.endpoint="{self.endpoint}"',
                   f'metrics.listen="127.0.0.1:{self.metrics_port}"', *extra):
            out += ["--set", kv]
        return out


@pytest.fixture
def iso(tmp_path) -> Isolated:
    return Isolated(tmp_path)


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in m for m in self.messages):
                return True
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            with contextlib.suppress(socket.timeout):
                self.messages.append(self.sock.recv(4096).decode())
        return any(text in m for m in self.messages)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


@pytest.fixture(scope="session")
def enrolled_state(tmp_path_factory) -> Path:
    """A gallery with the bundled held-out speakers enrolled, made by the real CLI."""
    state = tmp_path_factory.mktemp("enrolled") / "state"
    for name, clip in (("theo", "enroll_theo.flac"), ("asc02", "enroll_asc02.flac"), ("asc07", "enroll_asc07.flac")):
        r = streamd("enroll", "--set", f'state.dir="{state}"', name, str(DATA / clip))
        assert r.returncode == 0, r.stderr
    return state


def pytest_collection_modifyitems(items):
    """A test that needs the PulseAudio server (marked pulse, or given a null sink) starts an
    outside server: it is marked ``server`` too, so ``-m "not server"`` leaves it out."""
    for item in items:
        if item.get_closest_marker("pulse") or "null_sink" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)


def pactl(*args: str) -> str:
    return subprocess.run(["pactl", *args], check=True, capture_output=True, text=True, timeout=20).stdout


@pytest.fixture
def null_sink():
    """A null sink, made for each test: its monitor is the microphone. (Per test: the unplug
    test restarts the sound server, which takes every sink with it.)"""
    assert shutil.which("pulseaudio") and shutil.which("paplay"), "PulseAudio is missing: run `make test` (installs it)"
    started = None
    if subprocess.run(["pactl", "info"], capture_output=True, timeout=20).returncode != 0:
        started = subprocess.run(["pulseaudio", "--daemon", "--exit-idle-time=-1", "--system=false"],
                                 capture_output=True, text=True, timeout=30)
        deadline = time.monotonic() + 15
        while subprocess.run(["pactl", "info"], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, f"could not start PulseAudio: {started.stderr}"
            time.sleep(0.2)
    name = f"streamd_test_{os.getpid()}"
    module = pactl("load-module", "module-null-sink", f"sink_name={name}", "rate=16000", "channels=1",
                   "format=s16le").strip()
    yield name
    subprocess.run(["pactl", "unload-module", module], capture_output=True)
    if started is not None:
        subprocess.run(["pulseaudio", "--kill"], capture_output=True)


@pytest.fixture
def curve(tmp_path):
    """A daemon key pair, one authorised client, and an intruder with keys of its own."""
    keys.generate(tmp_path / "server", "server")
    keys.generate(tmp_path / "client", "client")
    keys.generate(tmp_path / "intruder", "intruder")
    (tmp_path / "clients").mkdir()
    shutil.copy(tmp_path / "client" / "client.key", tmp_path / "clients" / "client.key")
    return tmp_path


# ---------------------------------------------------------------- PostgreSQL (tests/pg.py)


@pytest.fixture(scope="session")
def pg_server():
    """One throw-away PostgreSQL for the test session (skips when it is not installed)."""
    from pg import PgCluster, need_postgres

    cluster = PgCluster(need_postgres())
    cluster.start()
    yield cluster
    cluster.close()


@pytest.fixture
def pg_url(pg_server, request) -> str:
    """A fresh, empty database on the session's PostgreSQL: its postgresql:// URL."""
    import re

    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40] + f"_{os.getpid()}_{time.monotonic_ns() % 10**6}"
    return pg_server.create_database(name)
