"""CurveZMQ keys for remote control (docs/control.md, "Remote control with CurveZMQ").

Keys are ZeroMQ certificate files as ``zmq.auth`` writes them: ``NAME.key`` holds the
public key (give it to the other side), ``NAME.key_secret`` the public and secret key
(mode 0600, never leaves the machine). Every problem raises ``KeyFileError`` with one line
naming the file.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

DEFAULT_DIR = "~/.config/streamd/curve"


class KeyFileError(ValueError):
    """A key file that is missing, unreadable, malformed or too open."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes


def generate(directory: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (0600) in ``directory`` (made 0700)."""
    if not name or "/" in name or name.startswith(".") or any(ord(c) < 32 for c in name):
        raise KeyFileError(f"{name!r}: not a usable key name")
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    existing = [str(p) for p in (public, secret) if p.exists()]
    if existing and not force:
        raise KeyFileError(f"{existing[0]}: already exists (--force replaces it)")
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, stat.S_IRWXU)
        for p in (public, secret):
            if force and p.exists():
                p.unlink()
        made_public, made_secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old_umask)
    os.chmod(made_secret, stat.S_IRUSR | stat.S_IWUSR)
    os.chmod(made_public, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    return Path(made_public), Path(made_secret)


def _valid_key(key: bytes | None) -> bool:
    if key is None or len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except (ValueError, KeyError):
        return False


def _read(path: Path) -> tuple[bytes | None, bytes | None]:
    try:
        with open(path, "rb"):
            pass
        return zmq.auth.load_certificate(path)
    except IsADirectoryError:
        raise KeyFileError(f"{path}: is a folder, not a key file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file: {exc.strerror or exc}") from None
    except ValueError:
        raise KeyFileError(f"{path}: not a CurveZMQ certificate (no public-key)") from None


def load_secret(path: Path) -> KeyPair:
    """A secret certificate (``NAME.key_secret``): owner-only, with a matching key pair."""
    public, secret = _read(path)
    if not _valid_key(public) or not _valid_key(secret):
        raise KeyFileError(f"{path}: not a secret CurveZMQ certificate (needs public-key and secret-key; "
                           "the NAME.key_secret file of `streamd keys generate`)")
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"{path}: its public-key does not belong to its secret-key")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise KeyFileError(f"{path}: secret key file is accessible to others (mode {mode:04o}; chmod 600 it)")
    return KeyPair(public, secret)


def load_public(path: Path) -> bytes:
    """The public key of a certificate (``NAME.key``; a secret one works too)."""
    public, _secret = _read(path)
    if not _valid_key(public):
        raise KeyFileError(f"{path}: public-key is not a 40-character Z85 CurveZMQ key")
    return public


def load_clients(directory: Path) -> dict[bytes, Path]:
    """The authorised clients: the public keys of every ``*.key`` file in ``directory``."""
    if not directory.is_dir():
        raise KeyFileError(f"{directory}: not a folder of client certificates")
    try:
        files = sorted(directory.glob("*.key"))
    except OSError as exc:
        raise KeyFileError(f"{directory}: cannot read: {exc.strerror or exc}") from None
    clients = {load_public(p): p for p in files}
    if not clients:
        raise KeyFileError(f"{directory}: no client certificates (*.key) in it; no client could connect")
    return clients
