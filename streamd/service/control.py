"""The control socket: JSON requests ``{"cmd": ..., ...}`` and JSON replies
``{"ok": true, ...}`` / ``{"ok": false, "error": "..."}`` over ZeroMQ (docs/control.md).

A ROUTER socket rather than REP: REQ clients see plain request/reply, while the daemon may
answer a slow command (``enroll_next``) later and keep serving others meanwhile. Nothing a
client sends can stop the daemon: malformed, oversized or unknown requests get an error reply.

Beyond loopback the socket is a CurveZMQ server: traffic is encrypted, and only clients whose
public key is in ``control.curve_clients`` complete the handshake (ZAP, ``ThreadAuthenticator``
on a context of the server's own, stopped by ``close``). Others never reach the handler.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

from streamd.config import ConfigError, local_endpoint, unit_directories
from streamd.keys import KeyFileError, KeyPair, load_clients, load_public, load_secret

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
# Beyond this ZeroMQ drops the connection without reading the message into memory at all.
HARD_LIMIT_BYTES = 1024 * 1024
ZAP_DOMAIN = "streamd"  # the authenticator answers for this domain only


class ControlError(ValueError):
    """A request the daemon refuses; the message goes back as the error."""


@dataclass(frozen=True)
class Pending:
    """A request whose reply comes later (``ControlServer.reply``), and who made it: "control",
    or "control:KEY" for a CurveZMQ client (KEY: its public key's file in control.curve_clients)."""

    envelope: tuple[bytes, ...]
    client: str = "control"


Handler = Callable[[dict[str, Any], Pending], dict[str, Any] | None]


@dataclass(frozen=True)
class ServerCurve:
    """The daemon's key pair and the folder of authorised clients' public certificates."""

    keys: KeyPair
    clients: Path

    def secure(self, ctx: zmq.Context, sock: zmq.Socket, domain: str, log_name: str):
        """Make ``sock`` a CURVE server that admits only the authorised clients, before its
        bind: with no ZAP handler running, libzmq would let any CURVE client in. Returns the
        running authenticator, to be stopped with the socket."""
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx, log=logging.getLogger(log_name))
        auth.start()
        auth.configure_curve(domain=domain, location=str(self.clients))
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
        return auth


@dataclass(frozen=True)
class ClientCurve:
    """A client's key pair and the daemon's public key."""

    keys: KeyPair
    server_public: bytes

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the daemon whose public key this holds."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)


def _key(cfg, name: str, loader):
    try:
        return loader(cfg.path(getattr(cfg.control, name)))
    except KeyFileError as exc:
        raise ConfigError(f"control.{name}: {exc}") from None


def server_curve(cfg) -> ServerCurve | None:
    """The CURVE server settings of ``[control]``, or None when curve_secret_key is unset."""
    if not cfg.control.curve_secret_key:
        return None
    _key(cfg, "curve_clients", load_clients)
    return ServerCurve(_key(cfg, "curve_secret_key", load_secret), cfg.path(cfg.control.curve_clients))


def client_curve(cfg, client_key: str | None = None, server_key: str | None = None) -> ClientCurve | None:
    """The CURVE client settings (``[control]`` curve_client_key and curve_server_key, or the
    given files instead), or None when no client key is set."""
    c = cfg.control
    client_key, server_key = client_key or c.curve_client_key, server_key or c.curve_server_key
    if not client_key:
        return None
    if not server_key:
        raise ConfigError("control.curve_server_key: needed with a client key (the daemon's NAME.key file)")
    try:
        pair = load_secret(cfg.path(client_key))
    except KeyFileError as exc:
        raise ConfigError(f"control.curve_client_key: {exc}") from None
    try:
        return ClientCurve(pair, load_public(cfg.path(server_key)))
    except KeyFileError as exc:
        raise ConfigError(f"control.curve_server_key: {exc}") from None


def default_endpoint() -> str:
    """Owner-only IPC in the runtime directory: systemd's RuntimeDirectory=, else the user's."""
    if os.environ.get("RUNTIME_DIRECTORY"):
        return f"ipc://{Path(os.environ['RUNTIME_DIRECTORY'].split(':')[0]) / 'control.sock'}"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/streamd-{os.getuid()}"
    return f"ipc://{Path(base) / 'streamd' / 'control.sock'}"


def client_endpoint(cfg) -> str:
    """The control endpoint a client tries: ``control.endpoint``, else the default one, except
    that when no daemon's socket is there but the service's is (the unit's RuntimeDirectory=),
    the service's."""
    if cfg.control.endpoint:
        return cfg.control.endpoint
    default = default_endpoint()
    if os.environ.get("RUNTIME_DIRECTORY") or reachable(default):
        return default
    service = unit_directories()[1] / "control.sock"
    return f"ipc://{service}" if os.path.lexists(service) else default


def _prepare_ipc(endpoint: str) -> Path | None:
    """An ipc:// socket lives in a folder only its owner can enter."""
    if not endpoint.startswith("ipc://"):
        return None
    path = Path(endpoint[len("ipc://"):])
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, stat.S_IRWXU)
    return path


def check_free(endpoint: str) -> None:
    """Refuse an ipc:// endpoint that a live daemon serves: ZeroMQ would unlink its socket
    file and bind silently, and the other daemon's clients would then be answered by this
    one (another gallery). A socket file with nobody behind it (a daemon killed) is taken
    over. (A tcp:// endpoint in use fails at bind by itself.)"""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://"):]
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:  # refused (stale), or not a socket we may reach: ZeroMQ's bind decides
        return
    finally:
        probe.close()
    raise EndpointInUse(f"control.endpoint {endpoint}: another streamd daemon is serving it "
                        "(stop that one, or give this one its own control.endpoint)")


class EndpointInUse(OSError):
    """The control endpoint is served by a live daemon (exit 69)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


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
    def __init__(self, endpoint: str, context: zmq.Context | None = None, curve: ServerCurve | None = None):
        if curve is None and not local_endpoint(endpoint):
            raise ConfigError(f"control.endpoint: {endpoint} is reachable beyond this machine; "
                              "set control.curve_secret_key and control.curve_clients (docs/control.md)")
        check_free(endpoint)
        self._auth = None
        self._own_ctx = None
        if curve is not None and context is None:
            # The ZAP handler is per context: a context of our own keeps it ours alone.
            self._own_ctx = zmq.Context()
        self._ctx = context or self._own_ctx or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.MAXMSGSIZE, HARD_LIMIT_BYTES)
        self._sock.setsockopt(zmq.LINGER, 500)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._key_names: dict[str, str] = {}  # a client's z85 public key: its file's name
        if curve is not None:
            for key, path in load_clients(curve.clients).items():
                name = Path(path).name.removesuffix(".key")
                self._key_names[key.decode() if len(key) == 40 else z85.encode(key).decode()] = name
        ipc_path = _prepare_ipc(endpoint)
        old_umask = os.umask(0o077)  # the ipc socket file is created owner-only
        try:
            if curve is not None:
                self._auth = curve.secure(self._ctx, self._sock, ZAP_DOMAIN, "streamd.service.control.auth")
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close(0)
            raise OSError(f"control.endpoint {endpoint}: cannot bind: {exc}") from None
        except BaseException:
            self.close(0)
            raise
        finally:
            os.umask(old_umask)
        if ipc_path is not None:
            os.chmod(ipc_path, stat.S_IRUSR | stat.S_IWUSR)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def poll(self, handler: Handler, timeout_ms: int = 0) -> int:
        """Serve every request waiting now; returns how many were served."""
        served = 0
        while self._sock.poll(timeout_ms if served == 0 else 0, zmq.POLLIN):
            parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            frames = [p.bytes for p in parts]
            try:
                split = frames.index(b"")
            except ValueError:
                continue  # not a REQ/DEALER envelope: nobody to answer
            pending = Pending(tuple(frames[: split + 1]), self._client(parts[-1]))
            served += 1
            self._serve(handler, frames[split + 1 :], pending)
        return served

    def _client(self, frame: zmq.Frame) -> str:
        """Who sent a request: the CurveZMQ key the authenticator admitted (its User-Id)."""
        if not self._key_names:
            return "control"
        try:
            key = frame.get("User-Id")
        except zmq.ZMQError:
            key = None
        return f"control:{self._key_names.get(key, key)}" if key else "control"

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
        data = json.dumps(reply, ensure_ascii=False).encode("utf-8")
        try:
            self._sock.send_multipart([*pending.envelope, data], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("control reply lost: %s", exc)

    def close(self, linger_ms: int | None = None) -> None:
        self._sock.close(linger_ms)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_ctx is not None:
            self._own_ctx.term()
            self._own_ctx = None


def reachable(endpoint: str) -> bool:
    """Whether an ipc:// endpoint's socket file exists (tcp:// is always tried)."""
    return not endpoint.startswith("ipc://") or os.path.exists(endpoint[len("ipc://"):])


def request(endpoint: str, message: dict[str, Any] | bytes, timeout_s: float = 10.0,
            context: zmq.Context | None = None, curve: ClientCurve | None = None) -> dict[str, Any] | None:
    """One request from a REQ client; None when nothing answers within the timeout (a CURVE
    server that refuses the client's key looks the same: no reply)."""
    deadline = time.monotonic() + timeout_s
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    # The request waits for a connection whose handshake succeeded, within the timeout. A
    # CURVE server that refuses the key closes the connection, and the REQ socket loses its
    # only pipe: a send without a time limit would then wait forever (seen under load, when
    # the refusal came before the send).
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))
    if curve is not None:
        curve.secure(sock)
    try:
        sock.connect(endpoint)
        try:
            sock.send(message if isinstance(message, bytes) else json.dumps(message).encode("utf-8"))
        except zmq.Again:
            return None
        if not sock.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
            return None
        return json.loads(sock.recv())
    finally:
        sock.close()
