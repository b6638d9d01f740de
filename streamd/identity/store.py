"""Which gallery backend serves: the SQLite file in the state directory (the default), or a
PostgreSQL database shared by several nodes (``state.gallery = "postgresql://..."``).

Both have the same public methods (streamd.identity.gallery.Gallery) and raise StorageError
for every storage failure. psycopg is imported only when a PostgreSQL gallery is asked for.
"""

from __future__ import annotations

from pathlib import Path

from streamd.identity.gallery import GALLERY_NAME, Gallery, StorageError


def is_shared(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_gallery(url: str, state_dir: Path, daemon: bool = False):
    """``url``: state.gallery ("" = the SQLite file in ``state_dir``). ``daemon``: a database
    that does not answer at start-up is waited for in the background (the daemon recognises
    nobody until it answers); otherwise (a command) that is a StorageError."""
    if not is_shared(url):
        return Gallery(state_dir / GALLERY_NAME)
    try:
        import psycopg  # noqa: F401  (the cluster extra)
    except ImportError:
        raise StorageError("state.gallery is a PostgreSQL URL but psycopg is not installed: "
                           "pip install 'streamd[cluster]'") from None
    from streamd.identity.pg_gallery import PgGallery

    return PgGallery(url, wait=daemon)


def describe(url: str, state_dir: Path) -> str:
    """The gallery as a log line or a message names it (a URL without its password)."""
    if not is_shared(url):
        return str(state_dir / GALLERY_NAME)
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts._replace(query=""))
