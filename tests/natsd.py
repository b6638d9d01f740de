"""A throw-away NATS server for tests: Debian's ``nats-server`` on a free loopback port, JetStream
on, its store in a temporary folder; stopped (or SIGKILLed and started again on the same port
and store) by the test. Without the binary the tests skip, saying so (``make`` installs it as
root). Named natsd, not nats: a tests/nats.py would hide the nats-py package.

Reuse: ``from natsd import nats_server, NatsServer`` (the fixture is imported into the test
module that uses it).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port


class NatsServer:
    def __init__(self, store: Path):
        self.binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.store = store
        self.port = free_port()
        self.monitor_port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 15.0) -> None:
        self.proc = subprocess.Popen([self.binary, "-p", str(self.port), "-a", "127.0.0.1", "-js", "-sd",
                                      str(self.store), "-m", str(self.monitor_port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout_s
        while not self._healthy():
            assert self.proc.poll() is None, f"nats-server exited: {self.proc.stderr.read()}"
            assert time.monotonic() < deadline, "nats-server did not become healthy"
            time.sleep(0.05)

    def _healthy(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                pass
            return self.monitor("healthz").get("status") == "ok"
        except OSError:
            return False

    def monitor(self, page: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/{page}", timeout=2) as reply:
            return json.loads(reply.read())

    def subscribed(self, subject: str) -> bool:
        """Whether some client holds a subscription to ``subject``."""
        return any(subject in (c.get("subscriptions_list") or []) for c in self.monitor("connz?subs=1")["connections"])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def nats_server(tmp_path):
    if shutil.which("nats-server") is None and not Path("/usr/sbin/nats-server").exists():
        pytest.skip("nats-server is not installed: apt-get install nats-server (make does it as root)")
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    yield server
    server.stop()
