"""The speaker gallery: SQLite in the state directory (WAL, one transaction per change).

It keeps every enrollment's features, not only its embeddings, so that when the speaker model
changes the gallery is re-embedded at start-up instead of silently scoring across models.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import os
import secrets
import sqlite3
import stat
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamd.identity.scoring import UNKNOWN, Utterance

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS speakers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS enrollments (
    id INTEGER PRIMARY KEY,
    speaker_id INTEGER NOT NULL REFERENCES speakers(id) ON DELETE CASCADE,
    features BLOB NOT NULL,          -- normalised MFCC frames, float32, row-major
    dims INTEGER NOT NULL,
    feature_key TEXT NOT NULL,       -- which feature parameters made them
    seconds REAL NOT NULL,           -- net speech
    source TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS embeddings (
    enrollment_id INTEGER NOT NULL REFERENCES enrollments(id) ON DELETE CASCADE,
    model_sha256 TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (enrollment_id, model_sha256)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- A random reference for each enrolled person, kept in the audit trail when the person is
-- removed (their name is not: docs/operations.md, "Personal data").
CREATE TABLE IF NOT EXISTS subjects (
    speaker_id INTEGER PRIMARY KEY REFERENCES speakers(id) ON DELETE CASCADE,
    subject TEXT NOT NULL UNIQUE
);
-- Who changed the gallery, how and when: enroll, promote, rename, remove. No biometric content.
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    who TEXT NOT NULL,               -- cli | control | control:KEY | local
    action TEXT NOT NULL,            -- enroll | promote | rename | remove
    subject TEXT NOT NULL,
    name TEXT,                       -- NULL once the person is removed
    old_name TEXT,                   -- rename: the name before; NULL once removed
    detail TEXT NOT NULL             -- JSON: counts and source kinds, never names or paths
);
-- Counts every change to the speakers (from any connection or process), so the daemon re-reads
-- them only then and not when unknown-voice clusters, in the same file, are written.
CREATE TABLE IF NOT EXISTS speaker_changes (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL);
INSERT OR IGNORE INTO speaker_changes VALUES (1, 0);
""" + "".join(
    f"CREATE TRIGGER IF NOT EXISTS {table}_{event.lower()}_counted AFTER {event} ON {table} "
    "BEGIN UPDATE speaker_changes SET n = n + 1; END;\n"
    for table in ("speakers", "enrollments", "embeddings") for event in ("INSERT", "UPDATE", "DELETE"))
GALLERY_NAME = "gallery.sqlite3"  # the file in the state directory (streamd.service.daemon.GALLERY_FILE)


class GalleryError(RuntimeError):
    """Enrollment or a gallery change was refused; the message says why."""


class StorageError(GalleryError, OSError):
    """The gallery's file cannot be written (or read): disk full, read-only state directory,
    I/O error. An OSError too, so callers that treat an unusable state directory as "no
    gallery" (the daemon at start-up) keep doing so."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def raises_storage_error(cls):
    """Every public method of a SQLite store raises StorageError, never sqlite3.Error: callers
    handle one storage error type, whichever backend (SQLite, PostgreSQL) is behind."""
    import functools

    def wrap(method):
        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except sqlite3.Error as exc:
                raise storage_error(getattr(self, "path", None) or "(gallery)", method.__name__.replace("_", " "),
                                    exc) from None
        return guarded

    for name, value in list(vars(cls).items()):
        if callable(value) and not name.startswith("_"):
            setattr(cls, name, wrap(value))
    return cls


def _why(exc: BaseException) -> str:
    """A short reason for a storage failure (SQLite error code or errno)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    err = getattr(exc, "errno", None)
    if name.startswith("SQLITE_FULL") or err == errno.ENOSPC or "disk is full" in str(exc):
        return "the disk is full"
    if name.startswith("SQLITE_READONLY") or err in (errno.EROFS, errno.EACCES, errno.EPERM) \
            or "readonly database" in str(exc):
        return "the state directory is read-only"
    if name.startswith("SQLITE_IOERR") or err == errno.EIO:
        return "disk I/O error"
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return "the database file is damaged"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return "the database is locked by another process"
    if name.startswith("SQLITE_CANTOPEN"):
        return "cannot open the database file"
    return "storage error"


def _read_only_dir(path: Path) -> bool:
    """A read-only file system (root too), or a folder this user may not write."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY) or not os.access(path, os.W_OK)
    except OSError:
        return False


def storage_error(path: Path, action: str, exc: BaseException) -> StorageError:
    """One line: what could not be done to the gallery, and why."""
    detail = " ".join(str(getattr(exc, "strerror", None) or exc).split())
    return StorageError(f"gallery {path}: cannot {action}: {_why(exc)} ({detail})")


def private_dir(folder: Path) -> None:
    """The state directory, made owner-only (0700) when streamd makes it, whatever the umask.
    One that exists already and others may enter is made 0700 too when it is streamd's own
    (this user's, holding nothing but the gallery: one an older streamd made 0755); any other
    folder is left as it is, with a warning."""
    if folder.is_dir():
        st = folder.stat()
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077 and st.st_uid == os.getuid() and all(
                p.name.startswith(GALLERY_NAME) for p in folder.iterdir()):
            with contextlib.suppress(OSError):  # a read-only file system: nothing can change there anyway
                os.chmod(folder, 0o700)
        elif mode & 0o077:
            log.warning("state directory %s is open to other users (mode %04o); its files are 0600, "
                        "but `chmod 700 %s` keeps even their names private", folder, mode, folder)
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
        os.chmod(folder, 0o700)


def private_file(path: Path) -> None:
    """Create the gallery file owner-only (0600) before SQLite opens it: SQLite gives its
    -wal and -shm files the database file's mode."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def tighten(path: Path) -> None:
    """The gallery and its -wal and -shm files 0600, where this user owns them (a gallery
    made by an older streamd, 0644, becomes private at its next start)."""
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(OSError):
            st = p.stat()
            if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
                os.chmod(p, stat.S_IMODE(st.st_mode) & 0o700)


@dataclass(frozen=True)
class SpeakerEntry:
    name: str
    enrollments: int
    seconds: float
    created: float
    updated: float


def validate_name(name: object) -> str:
    if not isinstance(name, str):
        raise GalleryError("speaker name must be a string")
    name = name.strip()
    if not name or len(name) > 64:
        raise GalleryError("speaker name must be 1-64 characters")
    if name == UNKNOWN or name.startswith(UNKNOWN + "-"):
        raise GalleryError(f"speaker name {name!r} is reserved")
    if any(ch in name for ch in "/\\") or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise GalleryError("speaker name must not contain control characters or path separators")
    return name


def to_blob(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def array_json(a: np.ndarray) -> dict:
    """An array in an export: its dtype, shape and little-endian bytes in base64."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "float32", "byteorder": "little", "shape": list(a.shape),
            "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def from_blob(blob: bytes, dims: int | None = None) -> np.ndarray:
    a = np.frombuffer(blob, dtype="<f4")
    return a.reshape(-1, dims) if dims else a


def enrollment_audit(source: str, utterances: list[Utterance]) -> tuple[str, dict]:
    """The audit trail's action and detail for an enrollment: counts and source kinds only."""
    kind, _, what = source.partition(":")
    detail: dict = {"source": kind, "utterances": len(utterances),
                    "seconds": round(sum(u.seconds for u in utterances), 2)}
    if kind == "cluster":
        detail["cluster"] = what
    elif kind == "files":  # how many, not their paths: a file is often named after its speaker
        detail["files"] = len(what.split(","))
    return ("promote" if kind == "cluster" else "enroll"), detail


def audit_entry(aid: int, at: float, who: str, action: str, subject: str, name: str | None,
                old: str | None, detail: str) -> dict:
    """An audit row as the trail's readers (events, export, CLI) see it."""
    entry = {"audit": aid, "time": at, "who": who, "action": action, "subject": subject, "name": name}
    if action == "rename":
        entry["from"] = old
    entry.update(json.loads(detail))
    return entry


@raises_storage_error
class Gallery:
    """The SQLite gallery, the default (streamd.identity.store.open_gallery chooses the backend;
    streamd.identity.pg_gallery is its PostgreSQL sibling, with the same public methods).

    When the state directory cannot be written (read-only file system, no space to even
    open the WAL), an existing gallery is opened read-only: enrolled speakers are still
    recognised, and every change is refused with ``readonly`` as the reason."""

    def __init__(self, path: Path):
        self.path = path
        self.readonly: str | None = None  # why changes are refused, when they are
        self.uri: str | None = None  # the read-only URI other connections use, when read-only
        try:
            private_dir(path.parent)
            private_file(path)
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")  # an acknowledged enrollment survives power loss
                self.db.execute("PRAGMA foreign_keys=ON")
                # Deleted rows are overwritten with zeros, not merely unlinked: a removed
                # speaker's voiceprint must not be recoverable from free pages.
                self.db.execute("PRAGMA secure_delete=ON")
                self.db.executescript(SCHEMA)
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            except sqlite3.Error:
                self.db.close()
                raise
            tighten(path)  # a gallery made by an older streamd, or its -wal and -shm
        except (OSError, sqlite3.Error) as exc:
            self._open_readonly(exc)
        self._version: int | None = None

    @property
    def down(self) -> str | None:
        """Why the gallery cannot be reached now (a shared database's outage); a file is always here."""
        return None

    @property
    def shared(self) -> bool:
        """Whether other nodes change this gallery too (a shared database)."""
        return False

    def cluster_store(self):
        """The store of unknown-voice clusters beside this gallery (its own connection)."""
        from streamd.identity.cluster_store import ClusterStore

        try:
            return ClusterStore(self.path, self.uri)
        except sqlite3.Error as exc:
            raise storage_error(self.path, "open clusters", exc) from None

    def word_store(self):
        """The storage of the word templates taught at run time, in this gallery."""
        from streamd.identity.word_store import SqliteWordStore

        return SqliteWordStore(self)

    def _open_readonly(self, exc: BaseException) -> None:
        if _read_only_dir(self.path.parent):  # SQLite says "unable to open database file"
            exc = OSError(errno.EROFS, os.strerror(errno.EROFS))
        if not self.path.is_file():
            raise storage_error(self.path, "create the gallery", exc) from None
        self.readonly = f"{_why(exc)} ({' '.join(str(getattr(exc, 'strerror', None) or exc).split())})"
        quoted = urllib.parse.quote(str(self.path.resolve()))
        # mode=ro needs the WAL index (-shm) to exist or be creatable; on a read-only file
        # system nobody can change the file, so immutable=1 is then exact.
        err: BaseException = exc
        for uri in (f"file:{quoted}?mode=ro", f"file:{quoted}?immutable=1"):
            db = None
            try:
                db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=5.0)
                db.execute("SELECT COUNT(*) FROM speakers").fetchone()
            except sqlite3.Error as last:
                if db is not None:
                    db.close()
                err = last
                continue
            self.db, self.uri = db, uri
            return
        raise storage_error(self.path, "open the gallery", err) from None

    def check_writable(self, action: str) -> None:
        if self.readonly is not None:
            raise StorageError(f"gallery {self.path}: cannot {action}: {self.readonly}")

    def close(self) -> None:
        self.db.close()

    def transaction(self):
        """``with gallery.transaction():`` — BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error."""
        return Transaction(self.db)

    def invalidate(self) -> None:
        """Make the next ``changed()`` true (SIGHUP: re-read everything)."""
        self._version = None

    def changed(self) -> bool:
        """True when the speakers changed (in any connection) since the last call."""
        try:
            (key,) = self.db.execute("SELECT n FROM speaker_changes").fetchone()
        except sqlite3.Error:  # a gallery made before the counter, opened read-only: any change
            (version,) = self.db.execute("PRAGMA data_version").fetchone()
            key = hash((version, self.db.total_changes))
        changed = key != self._version
        self._version = key
        return changed

    # ------------------------------------------------------------------ speakers

    def speaker_id(self, name: str) -> int | None:
        row = self.db.execute("SELECT id FROM speakers WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def add_enrollments(self, name: str, utterances: list[Utterance], vectors: np.ndarray,
                        model_sha256: str, feature_key: str, source: str, who: str = "local") -> None:
        """Add utterances (and their embeddings for the current model) to a speaker, creating
        it; the audit trail records it (``who``: the client) in the same transaction."""
        name = validate_name(name)
        now = time.time()
        self.check_writable(f"enroll {name!r}")
        try:
            with self.transaction():
                self.db.execute(
                    "INSERT INTO speakers(name, created, updated) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET updated = excluded.updated", (name, now, now))
                sid = self.speaker_id(name)
                for utt, vec in zip(utterances, vectors):
                    cur = self.db.execute(
                        "INSERT INTO enrollments(speaker_id, features, dims, feature_key, seconds, source, created) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (sid, to_blob(utt.features), utt.features.shape[1], feature_key, utt.seconds, source, now))
                    self.db.execute("INSERT INTO embeddings(enrollment_id, model_sha256, vector) VALUES (?, ?, ?)",
                                    (cur.lastrowid, model_sha256, to_blob(vec)))
                action, detail = enrollment_audit(source, utterances)
                self._audit(who, action, sid, name, detail=detail, now=now)
        except sqlite3.Error as exc:
            raise storage_error(self.path, f"enroll {name!r}", exc) from None

    def remove(self, name: str, who: str = "local") -> bool:
        """Delete a speaker with every enrollment and embedding, then erase the old pages
        from the write-ahead log (``erase``): nothing of them is left in any file. The audit
        trail keeps the removal, and the person's earlier entries, under their subject
        reference only: the name goes from them too."""
        return self.remove_speaker(name, who) is not None

    def remove_speaker(self, name: str, who: str = "local", clusters: tuple[int, ...] = (),
                       features: tuple[bytes, ...] = ()) -> list[int] | None:
        """``remove``, and in the same transaction the unknown-voice clusters of their voice
        (``clusters``) and the cluster members stored with their enrolled ``features`` (a
        cluster left empty goes too). Returns the clusters deleted; None when nobody has that name."""
        self.check_writable(f"remove {name!r}")
        try:
            with self.transaction():
                sid = self.speaker_id(name)
                if sid is None:
                    return None
                subject = self._subject(sid)
                n, seconds = self.db.execute("SELECT COUNT(*), COALESCE(SUM(seconds), 0) FROM enrollments "
                                             "WHERE speaker_id = ?", (sid,)).fetchone()
                self.db.execute("DELETE FROM speakers WHERE id = ?", (sid,))
                dropped = self._drop_clusters(clusters, features)
                self.db.execute("UPDATE audit SET name = NULL, old_name = NULL WHERE subject = ?", (subject,))
                self._audit(who, "remove", None, None, subject=subject,
                            detail={"enrollments": n, "seconds": round(seconds, 2)})
        except sqlite3.Error as exc:
            raise storage_error(self.path, f"remove {name!r}", exc) from None
        self.erase()
        return dropped

    def _drop_clusters(self, clusters: tuple[int, ...], features: tuple[bytes, ...]) -> list[int]:
        """Inside remove_speaker's transaction (the clusters' tables are in this file, when made)."""
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'clusters'").fetchone():
            return []
        touched = set()
        for blob in features:
            for mid, cid in self.db.execute("SELECT id, cluster_id FROM cluster_members WHERE features = ?",
                                            (blob,)).fetchall():
                self.db.execute("DELETE FROM cluster_members WHERE id = ?", (mid,))
                touched.add(cid)
        emptied = {cid for cid in touched if self.db.execute(
            "SELECT 1 FROM cluster_members WHERE cluster_id = ? LIMIT 1", (cid,)).fetchone() is None}
        gone = sorted({*clusters, *emptied})
        for cid in gone:
            self.db.execute("DELETE FROM clusters WHERE id = ?", (cid,))
        return gone

    # ------------------------------------------------------------------ audit trail and export

    def _subject(self, sid: int) -> str:
        """The person's random reference (made at their first audited change)."""
        row = self.db.execute("SELECT subject FROM subjects WHERE speaker_id = ?", (sid,)).fetchone()
        if row:
            return row[0]
        subject = secrets.token_hex(6)
        self.db.execute("INSERT INTO subjects(speaker_id, subject) VALUES (?, ?)", (sid, subject))
        return subject

    def _audit(self, who: str, action: str, sid: int | None, name: str | None, old_name: str | None = None,
               subject: str | None = None, detail: dict | None = None, now: float | None = None) -> None:
        """One entry of the audit trail, inside the change's transaction."""
        if subject is None:
            subject = self._subject(sid)
        self.db.execute("INSERT INTO audit(time, who, action, subject, name, old_name, detail) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (now or time.time(), who, action, subject, name, old_name, json.dumps(detail or {})))

    def audit(self, after: int = 0, subject: str | None = None, limit: int = 100000) -> list[dict]:
        """Entries of the audit trail with an id above ``after`` (of one subject), oldest first.
        An old gallery opened read-only, made before the trail, has none."""
        where, args = "id > ?", [after]
        if subject is not None:
            where, args = where + " AND subject = ?", [after, subject]
        try:
            rows = self.db.execute(f"SELECT id, time, who, action, subject, name, old_name, detail FROM audit "
                                   f"WHERE {where} ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        except sqlite3.OperationalError:  # no such table
            return []
        return [audit_entry(*row) for row in rows]

    def last_audit(self) -> int:
        try:
            return self.db.execute("SELECT COALESCE(MAX(id), 0) FROM audit").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    def export(self, name: str) -> dict:
        """Everything stored about a speaker: their entry, each enrollment with its source,
        length, time, stored features and embeddings, and their audit trail. Raises
        GalleryError when nobody has that name."""
        row = self.db.execute("SELECT id, name, created, updated FROM speakers WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise GalleryError(f"no enrolled speaker named {name!r}")
        sid = row[0]
        try:
            subject = self.db.execute("SELECT subject FROM subjects WHERE speaker_id = ?", (sid,)).fetchone()
        except sqlite3.OperationalError:
            subject = None
        enrollments = []
        for eid, blob, dims, key, seconds, source, created in self.db.execute(
                "SELECT id, features, dims, feature_key, seconds, source, created FROM enrollments "
                "WHERE speaker_id = ? ORDER BY id", (sid,)).fetchall():
            vectors = self.db.execute("SELECT model_sha256, vector FROM embeddings WHERE enrollment_id = ? "
                                      "ORDER BY model_sha256", (eid,)).fetchall()
            enrollments.append({
                "source": source, "seconds": round(seconds, 3), "created": created, "feature_key": key,
                "features": array_json(from_blob(blob, dims)),
                "embeddings": [{"model_sha256": sha, "vector": from_blob(v).tolist()} for sha, v in vectors]})
        subject = subject[0] if subject else None
        return {"name": row[1], "subject": subject, "created": row[2], "updated": row[3],
                "enrollments": enrollments, "audit": self.audit(subject=subject) if subject else []}

    def erase(self) -> bool:
        """Copy the write-ahead log into the database and truncate it to nothing. With
        secure_delete the database holds zeros where deleted rows were; the log, until now,
        still held the pages as they were before (every enrollment written since the last
        checkpoint). Another process reading the gallery at that moment can hold the log
        back (SQLite waits up to 5 s for it): False then, and the old pages stay in the log
        until the next checkpoint."""
        try:
            busy, _, _ = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            log.warning("gallery %s: could not checkpoint the write-ahead log: %s", self.path, exc)
            return False
        if busy:
            log.warning("gallery %s: another process holds the gallery open; removed data stays in %s-wal "
                        "until it lets go", self.path, self.path.name)
        return not busy

    def rename(self, old: str, new: str, who: str = "local") -> None:
        new = validate_name(new)
        self.check_writable(f"rename {old!r}")
        try:
            with self.transaction():
                sid = self.speaker_id(old)
                if sid is None:
                    raise GalleryError(f"no enrolled speaker named {old!r}")
                if self.speaker_id(new) is not None:
                    raise GalleryError(f"a speaker named {new!r} is already enrolled")
                self.db.execute("UPDATE speakers SET name = ?, updated = ? WHERE name = ?", (new, time.time(), old))
                self._audit(who, "rename", sid, new, old_name=old)
        except sqlite3.Error as exc:
            raise storage_error(self.path, f"rename {old!r}", exc) from None

    def speakers(self) -> list[SpeakerEntry]:
        rows = self.db.execute(
            "SELECT s.name, COUNT(e.id), COALESCE(SUM(e.seconds), 0), s.created, s.updated "
            "FROM speakers s LEFT JOIN enrollments e ON e.speaker_id = s.id GROUP BY s.id ORDER BY s.name")
        return [SpeakerEntry(*row) for row in rows]

    def embeddings(self, model_sha256: str) -> dict[str, np.ndarray]:
        """Each speaker's enrollment embeddings for one model: {name: (n, dim)}."""
        rows = self.db.execute(
            "SELECT s.name, m.vector FROM embeddings m JOIN enrollments e ON e.id = m.enrollment_id "
            "JOIN speakers s ON s.id = e.speaker_id WHERE m.model_sha256 = ? ORDER BY s.name, e.id",
            (model_sha256,)).fetchall()
        out: dict[str, list[np.ndarray]] = {}
        for name, blob in rows:
            out.setdefault(name, []).append(from_blob(blob))
        return {k: np.stack(v) for k, v in out.items()}

    def enrollment_ids(self, feature_key: str) -> dict[str, tuple[int, ...]]:
        """Each speaker's enrollments stored with these features, oldest first: {name: ids}."""
        rows = self.db.execute(
            "SELECT s.name, e.id FROM enrollments e JOIN speakers s ON s.id = e.speaker_id "
            "WHERE e.feature_key = ? ORDER BY s.name, e.id", (feature_key,)).fetchall()
        out: dict[str, list[int]] = {}
        for name, eid in rows:
            out.setdefault(name, []).append(eid)
        return {name: tuple(ids) for name, ids in out.items()}

    def feature_blobs(self, name: str) -> list[bytes]:
        """The stored features of every enrollment of a speaker, as stored (any front end)."""
        return [blob for (blob,) in self.db.execute(
            "SELECT e.features FROM enrollments e JOIN speakers s ON s.id = e.speaker_id WHERE s.name = ?",
            (name,)).fetchall()]

    def enrollment_features(self, ids: tuple[int, ...]) -> list[np.ndarray]:
        """The stored features of these enrollments, in the order given."""
        marks = ",".join("?" * len(ids))
        rows = dict((eid, from_blob(blob, dims)) for eid, blob, dims in self.db.execute(
            f"SELECT id, features, dims FROM enrollments WHERE id IN ({marks})", ids).fetchall())
        return [rows[eid] for eid in ids if eid in rows]

    # ------------------------------------------------------------------ re-embedding

    def missing_embeddings(self, model_sha256: str, feature_key: str) -> list[tuple[int, np.ndarray]]:
        """Enrollments with no embedding for this model that can be embedded (same features)."""
        rows = self.db.execute(
            "SELECT e.id, e.features, e.dims FROM enrollments e WHERE e.feature_key = ? AND NOT EXISTS "
            "(SELECT 1 FROM embeddings m WHERE m.enrollment_id = e.id AND m.model_sha256 = ?)",
            (feature_key, model_sha256)).fetchall()
        return [(eid, from_blob(blob, dims)) for eid, blob, dims in rows]

    def stale_enrollments(self, feature_key: str) -> int:
        (n,) = self.db.execute("SELECT COUNT(*) FROM enrollments WHERE feature_key != ?", (feature_key,)).fetchone()
        return n

    def store_embeddings(self, model_sha256: str, vectors: list[tuple[int, np.ndarray]]) -> None:
        self.check_writable("store re-embedded enrollments")
        try:
            with self.transaction():
                self.db.executemany(
                    "INSERT OR REPLACE INTO embeddings(enrollment_id, model_sha256, vector) VALUES (?, ?, ?)",
                    [(eid, model_sha256, to_blob(v)) for eid, v in vectors])
                self.db.execute("DELETE FROM embeddings WHERE model_sha256 != ?", (model_sha256,))
        except sqlite3.Error as exc:
            raise storage_error(self.path, "store re-embedded enrollments", exc) from None


class Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.outer = False

    def __enter__(self):
        self.outer = not self.db.in_transaction
        if self.outer:
            self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        if not self.outer:
            return False
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:  # e.g. the disk filled up at commit: undo, then report
                self._rollback()
                raise
        else:
            self._rollback()
        return False

    def _rollback(self) -> None:
        # After SQLITE_FULL or an I/O error SQLite may already have rolled back by itself.
        if self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
