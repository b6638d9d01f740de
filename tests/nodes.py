"""A daemon as one node of several (issue 34): its own state dir, events, metrics, control and
network ports, a node id, optional NATS settings; started as a real `streamd run --source none`
that receives `streamd send` audio. Reuse: ``from nodes import Node``."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from conftest import DATA, Isolated, NotifySocket, free_port, start_streamd, stop, streamd
from streamd.service.events import subscribe


class Node:
    def __init__(self, tmp: Path, name: str, *sets: str):
        self.name = name
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.iso = Isolated(self.dir)
        self.listen = f"tcp://127.0.0.1:{free_port()}"
        self.sets = self.iso.sets(f'network.listen="{self.listen}"', f'control.endpoint="ipc://{self.dir}/control.sock"',
                                  f'node.id="{name}"', *sets)
        self.sub = subscribe(self.iso.endpoint)  # before the daemon: it misses nothing it publishes
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        notify = NotifySocket(self.dir / f"notify-{free_port()}.sock")
        try:
            # Ready only once self.sub has joined: an event published before would be lost to it.
            self.proc = start_streamd("run", *self.sets, "--source", "none", "--wait-subscriber", "20",
                                      env={"NOTIFY_SOCKET": notify.path})
            assert notify.wait_for("READY=1", 90), self.proc.stderr.read() if self.proc.poll() is not None else ""
        finally:
            notify.close()

    def send(self, stream: str, clip: str = "word.flac") -> None:
        r = streamd("send", "--source", f"file:{DATA / clip}", "--to", self.listen, "--stream", stream,
                    "--pace", "fast", timeout=60)
        assert r.returncode == 0, r.stderr

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        code = stop(self.proc) if self.proc is not None else 0
        self.sub.close(0)
        return code


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def taken_at(status: dict) -> int:
    """The frame a node first heard of a stream, from its ``status`` "up" event (0: from the start)."""
    match = re.search(r"from frame (\d+)", status["reason"])
    return int(match[1]) if match else 0

