"""The control socket: JSON requests ``{"cmd": ..., ...}`` and JSON replies
``{"ok": true, ...}`` / ``{"ok": false, "error": "..."}`` over ZeroMQ (docs/control.md).

A ROUTER socket rather than REP: REQ clients see plain request/reply, while the daemon may
answer a slow command (``enroll_next``) later and keep serving others meanwhile. Nothing a
client sends can stop the daemon: malformed, oversized or unknown requests get an error reply.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
# Beyond this ZeroMQ drops the connection without reading the message into memory at all.
HARD_LIMIT_BYTES = 1024 * 1024


class ControlError(ValueError):
    """A request the daemon refuses; the message goes back as the error."""


@dataclass(frozen=True)
class Pending:
    """A request whose reply comes later (``ControlServer.reply``)."""

    envelope: tuple[bytes, ...]


Handler = Callable[[dict[str, Any], Pending], dict[str, Any] | None]


def default_endpoint() -> str:
    """Owner-only IPC in the runtime directory: systemd's RuntimeDirectory=, else the user's."""
    if os.environ.get("RUNTIME_DIRECTORY"):
        return f"ipc://{Path(os.environ['RUNTIME_DIRECTORY'].split(':')[0]) / 'control.sock'}"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/streamd-{os.getuid()}"
    return f"ipc://{Path(base) / 'streamd' / 'control.sock'}"


def _prepare_ipc(endpoint: str) -> Path | None:
    """An ipc:// socket lives in a folder only its owner can enter."""
    if not endpoint.startswith("ipc://"):
        return None
    path = Path(endpoint[len("ipc://"):])
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, stat.S_IRWXU)
    return path


def parse_request(frames: list[bytes]) -> dict[str, Any]:
    body = frames[-1] if frames else b""
    if len(body) > MAX_REQUEST_BYTES:
        raise ControlError(f"request too large ({len(body)} bytes > {MAX_REQUEST_BYTES})")
    try:
        request = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"malformed request: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        raise ControlError('malformed request: expected a JSON object with a "cmd" string')
    return request


class ControlServer:
    def __init__(self, endpoint: str, context: zmq.Context | None = None):
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.MAXMSGSIZE, HARD_LIMIT_BYTES)
        self._sock.setsockopt(zmq.LINGER, 500)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        ipc_path = _prepare_ipc(endpoint)
        old_umask = os.umask(0o077)  # the ipc socket file is created owner-only
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            raise OSError(f"control.endpoint {endpoint}: cannot bind: {exc}") from None
        finally:
            os.umask(old_umask)
        if ipc_path is not None:
            os.chmod(ipc_path, stat.S_IRUSR | stat.S_IWUSR)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.requests = 0
        self.errors = 0

    def poll(self, handler: Handler, timeout_ms: int = 0) -> int:
        """Serve every request waiting now; returns how many were served."""
        served = 0
        while self._sock.poll(timeout_ms if served == 0 else 0, zmq.POLLIN):
            frames = self._sock.recv_multipart(zmq.NOBLOCK)
            try:
                split = frames.index(b"")
            except ValueError:
                continue  # not a REQ/DEALER envelope: nobody to answer
            pending = Pending(tuple(frames[: split + 1]))
            served += 1
            self.requests += 1
            self._serve(handler, frames[split + 1 :], pending)
        return served

    def _serve(self, handler: Handler, body: list[bytes], pending: Pending) -> None:
        try:
            request = parse_request(body)
            reply = handler(request, pending)
        except ControlError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug in one command must not take the daemon down
            log.exception("control command failed")
            reply = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        if reply is not None:
            self.reply(pending, reply)

    def reply(self, pending: Pending, reply: dict[str, Any]) -> None:
        if not reply.get("ok", False):
            self.errors += 1
        data = json.dumps(reply, ensure_ascii=False).encode("utf-8")
        try:
            self._sock.send_multipart([*pending.envelope, data], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("control reply lost: %s", exc)

    def close(self) -> None:
        self._sock.close()


def reachable(endpoint: str) -> bool:
    """Whether an ipc:// endpoint's socket file exists (tcp:// is always tried)."""
    return not endpoint.startswith("ipc://") or os.path.exists(endpoint[len("ipc://"):])


def request(endpoint: str, message: dict[str, Any] | bytes, timeout_s: float = 10.0,
            context: zmq.Context | None = None) -> dict[str, Any] | None:
    """One request from a REQ client; None when nothing answers within the timeout."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(message if isinstance(message, bytes) else json.dumps(message).encode("utf-8"))
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        return json.loads(sock.recv())
    finally:
        sock.close()
