"""Who may use the console (docs/console.md, "Access").

Loopback only by default. Any other listen address needs a token, given once on the login page
(then an HttpOnly cookie) or as ``Authorization: Bearer TOKEN``, compared in constant time, and
TLS or ``console.plain_http``. Every change is a POST that carries this process's CSRF token
(embedded in each page) from the console's own origin."""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from streamd.config import Config, ConfigError, host_port, local_endpoint

MIN_TOKEN_CHARS = 16
COOKIE = "streamd_console"
CSRF_HEADER = "x-csrf-token"
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


@dataclass(frozen=True)
class ListenPlan:
    host: str
    port: int
    token: str  # "" = none
    tls: tuple[Path, Path] | None  # certificate and key

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"


def plan(cfg: Config, listen: str | None) -> ListenPlan:
    """Where and how the console listens; a ConfigError (one line) when that would expose it:
    beyond loopback without a token, or without TLS unless console.plain_http says so."""
    c = cfg.console
    key = "--listen" if listen else "console.listen"
    host, port = host_port(listen or c.listen, key)
    token = load_token(cfg)
    tls = (cfg.path(c.tls_cert), cfg.path(c.tls_key)) if c.tls_cert else None
    for path in tls or ():
        if not os.access(path, os.R_OK):
            raise ConfigError(f"console.tls_{'cert' if path == tls[0] else 'key'}: {path}: cannot read it")
    if not loopback(host):
        if not token:
            raise ConfigError(f"{key}: {host}:{port} is beyond loopback: set console.token or console.token_file "
                              "(docs/console.md, \"Access\")")
        if tls is None and not c.plain_http:
            raise ConfigError(f"{key}: {host}:{port} is beyond loopback: set console.tls_cert and console.tls_key, "
                              "or console.plain_http = true behind a TLS proxy (docs/console.md)")
    return ListenPlan(host, port, token, tls)


def loopback(host: str) -> bool:
    return local_endpoint(f"tcp://{host}:1") and host != ""


def load_token(cfg: Config) -> str:
    c = cfg.console
    if c.token_file:
        token = _read_token_file(cfg.path(c.token_file))
        key = "console.token_file"
    else:
        token, key = c.token.strip(), "console.token"
    if token and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{key}: at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 16`)")
    return token


def _read_token_file(path: Path) -> str:
    try:
        mode = os.stat(path).st_mode
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"console.token_file: {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"console.token_file: {path}: others may read it (make it 0600)")
    if not text:
        raise ConfigError(f"console.token_file: {path}: empty")
    return text


def same(given: str | None, expected: str) -> bool:
    """Constant-time comparison; nothing given never matches."""
    return bool(given) and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


@dataclass(frozen=True)
class Policy:
    token: str  # "" = none: loopback only
    csrf: str  # this process's, in every page
    secure: bool  # HTTPS: the cookie is Secure

    @classmethod
    def of(cls, listen: ListenPlan) -> "Policy":
        return cls(listen.token, secrets.token_urlsafe(32), listen.tls is not None)

    def authenticated(self, headers: dict[str, str], cookies: dict[str, str]) -> bool:
        if not self.token:
            return True
        scheme, _, value = headers.get("authorization", "").partition(" ")
        given = value.strip() if scheme.lower() == "bearer" else cookies.get(COOKIE)
        return same(given, self.token)

    def host_allowed(self, host_header: str) -> bool:
        """Without a token only loopback names are answered: a page elsewhere that points its
        own name at 127.0.0.1 (DNS rebinding) would otherwise be same-origin with the console."""
        if self.token:
            return True
        host = urlsplit(f"//{host_header}").hostname or ""
        if host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def same_origin(self, headers: dict[str, str]) -> bool:
        """A request a browser sends from another site names that site in Origin (or in
        Referer); one with neither comes from a script, not a page."""
        source = headers.get("origin") or headers.get("referer")
        if not source:
            return True
        return urlsplit(source).netloc == headers.get("host", "")

    def csrf_ok(self, headers: dict[str, str]) -> bool:
        return same(headers.get(CSRF_HEADER), self.csrf) and self.same_origin(headers)

    def cookie(self) -> str:
        secure = "; Secure" if self.secure else ""
        return f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict{secure}"
