"""The gallery in PostgreSQL, shared by several nodes (``state.gallery = "postgresql://..."``):
the SQLite Gallery's public methods, the same tables, one transaction per change, the same
audit trail and erasure (a speaker's rows, their clusters included, in one transaction).

What the audio path reads (each speaker's enrollment ids and features, the word templates,
the newest audit entries) is a snapshot in memory, refreshed by a watcher thread with its own
connection: it LISTENs for the NOTIFY the schema's triggers send at each commit, and checks
the change counters every ``check_every_s`` anyway. So a change made on any node is seen in
well under a second, and a database that goes away never blocks recognition: the snapshot
stays, ``down`` says why, changes are refused ("gallery unavailable: ...") at once instead of
waiting on the network, and the watcher reconnects and re-reads when it returns.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, TypeVar

import numpy as np
import psycopg

from streamd.identity.gallery import (GalleryError, SpeakerEntry, StorageError, array_json, audit_entry,
                                      enrollment_audit, from_blob, to_blob, validate_name)
from streamd.identity.pg_schema import CHANNEL, LOCK, SCHEMA_VERSION, TABLES, TRIGGERS
from streamd.identity.scoring import Utterance
from streamd.identity.store import describe

log = logging.getLogger(__name__)

T = TypeVar("T")
CONNECT_TIMEOUT_S = 2
STATEMENT_TIMEOUT_MS = 5000
RETRY_S = 0.5  # between reconnection attempts of the watcher
# The watcher's check must answer within this, else the database is taken as gone. A server
# that hangs (stopped, or packets dropped) answers nothing and libpq waits forever: the
# watcher then cuts its connection and every call in flight, so no caller waits on it longer.
WATCH_TIMEOUT_S = 1.5
AUDIT_TAIL = 1000  # the newest audit entries kept in memory for the daemon's gallery events


def one_line(exc: BaseException) -> str:
    """libpq's first line (the rest is hints: "Is the server running on that host ...")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def connect(url: str) -> psycopg.Connection:
    """Short timeouts everywhere: a database that does not answer is found out in seconds."""
    return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, application_name="streamd",
                           options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                           keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=2,
                           tcp_user_timeout=CONNECT_TIMEOUT_S * 2000)


def abort(db: psycopg.Connection | None) -> None:
    """Cut ``db``'s socket, from any thread: a call blocked on it fails at once."""
    if db is None or db.closed:
        return
    try:
        with socket.socket(fileno=os.dup(db.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error):
        pass  # closed meanwhile


class Lane:
    """A connection of its own and its lock: the commands' work, and the cluster writer, do
    not wait for each other. ``busy``: the connection while a call runs on it."""

    def __init__(self):
        self.lock = threading.RLock()
        self.db: psycopg.Connection | None = None
        self.generation = -1
        self.busy: psycopg.Connection | None = None

    def drop(self) -> None:
        if self.db is not None:
            self.db.close()
        self.db = None


def prepare(db: psycopg.Connection) -> None:
    """Create or check the schema, one node at a time."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
        found = db.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()[0] and db.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if found and int(found[0]) > SCHEMA_VERSION:
            raise StorageError(f"the gallery's schema is version {found[0]}, newer than this streamd's "
                               f"({SCHEMA_VERSION}): upgrade streamd")
        db.execute(TABLES)
        db.execute(TRIGGERS)
        db.execute("INSERT INTO meta VALUES ('schema_version', %s) ON CONFLICT (key) DO UPDATE SET value = "
                   "EXCLUDED.value", (str(SCHEMA_VERSION),))


@dataclass(frozen=True)
class Snapshot:
    """What the audio path reads, replaced whole (never changed in place) by each refresh."""

    version: int = 0  # bumped whenever the speakers' enrollments change
    counts: dict = field(default_factory=dict)  # the database's change counters it reflects
    enrollments: tuple = ()  # (enrollment id, speaker name, feature key), by name then id
    features: dict = field(default_factory=dict)  # enrollment id: (frames, dims) float32
    words: tuple = ()  # (vocabulary, digit, model sha256, vector bytes)
    audit_floor: int | None = None  # the audit tail holds every entry above this id
    audit: tuple = ()  # the newest audit entries (dicts), oldest first


class PgGallery:
    readonly: str | None = None  # a database is never opened read-only: it is there or it is not
    uri = None

    def __init__(self, url: str, wait: bool = False, check_every_s: float = 1.0):
        """``wait``: a database that does not answer now is waited for by the watcher thread
        (the daemon); otherwise (a command) that is a StorageError."""
        self.url = url
        self.path = describe(url, None)  # named in messages, without the password
        self.check_every_s = check_every_s
        self._work = Lane()  # changes and reads of the commands
        self._lanes = [self._work]
        self._generation = 0  # bumped by each reconnection of the watcher: the lanes' connections are renewed
        self._refreshing = threading.Lock()  # one refresh at a time publishes a snapshot
        self._snap = Snapshot()
        self._seen: int | None = None
        self._down: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.on_change: Callable[[], None] | None = None  # called on the watcher's thread after a refresh
        self.on_up: list[Callable[[], None]] = []  # called on the watcher's thread when the database returns
        try:
            self.using("open the gallery", prepare)
            self.using("read the gallery", self._refresh)
        except StorageError as exc:
            if not wait:
                raise
            self._set_down(str(exc).removeprefix("gallery unavailable: "))
        if wait:
            self._watcher = threading.Thread(target=self._watch, name="gallery-watch", daemon=True)
            self._watcher.start()

    # ------------------------------------------------------------------ state

    @property
    def down(self) -> str | None:
        """Why the database cannot be reached now, or None."""
        return self._down

    @property
    def shared(self) -> bool:
        return True

    def _set_down(self, why: str) -> None:
        if self._down is None:
            log.warning("gallery %s unavailable: %s; recognising with the %d enrolled speakers in memory, "
                        "changes refused until it returns", self.path, why,
                        len({name for _, name, _ in self._snap.enrollments}))
        self._down = why
        for lane in self._lanes:  # calls in flight on a database that hangs would wait forever
            abort(lane.busy)

    def _set_up(self) -> None:
        if self._down is None:
            return
        log.info("gallery %s is back: re-read, %d enrolled speakers", self.path,
                 len({name for _, name, _ in self._snap.enrollments}))
        self._down = None
        for catch_up in self.on_up:
            try:
                catch_up()
            except Exception:  # the watcher must go on
                log.exception("gallery %s: catching up failed", self.path)

    def check_writable(self, action: str) -> None:
        if self._down is not None:
            raise StorageError(f"gallery unavailable: cannot {action}: {self._down}")

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(self.check_every_s + CONNECT_TIMEOUT_S + 1)
        for lane in self._lanes:
            with lane.lock:
                lane.drop()

    def lane(self) -> Lane:
        """A connection of its own for a caller that must not wait behind the commands."""
        lane = Lane()
        self._lanes.append(lane)
        return lane

    # ------------------------------------------------------------------ the work connection

    def using(self, action: str, work: Callable[[psycopg.Connection], T], lane: Lane | None = None) -> T:
        """``work(connection)`` on ``lane``'s connection (the commands' by default; the cluster
        and word stores use it too); a lost database marks the gallery down and raises
        "gallery unavailable"; any other database error is a StorageError naming ``action``.
        While the gallery is down this fails at once (the watcher reconnects)."""
        lane = lane or self._work
        with lane.lock:
            if self._down is not None and self._watcher is not None:
                raise StorageError(f"gallery unavailable: cannot {action}: {self._down}")
            try:
                db = lane.busy = self._connection(lane)
                return work(db)
            except psycopg.Error as exc:
                if lane.db is None or lane.db.broken or lane.db.closed:
                    lane.drop()
                    if self._watcher is not None:
                        self._set_down(one_line(exc))
                    raise StorageError(f"gallery unavailable: cannot {action}: {one_line(exc)}") from None
                raise StorageError(f"gallery {self.path}: cannot {action}: {one_line(exc)}") from None
            finally:
                lane.busy = None

    def _connection(self, lane: Lane) -> psycopg.Connection:
        if lane.db is not None and (lane.db.closed or lane.generation != self._generation):
            lane.drop()
        if lane.db is None:
            lane.generation = self._generation
            lane.db = connect(self.url)
        return lane.db

    def changing(self, action: str, work: Callable[[psycopg.Connection], T], lane: Lane | None = None) -> T:
        """A change: one transaction, gallery writers one at a time (so audit ids are
        committed in order), then this node's snapshot re-read at once."""
        self.check_writable(action)

        def change(db: psycopg.Connection) -> T:
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
                out = work(db)
            try:  # committed: what follows must not turn the answer into an error
                self._refresh(db)
            except psycopg.Error as exc:
                log.warning("gallery %s: %s done, but re-reading it failed (%s); the watcher catches up",
                            self.path, action, one_line(exc))
            return out

        return self.using(action, change, lane)

    # ------------------------------------------------------------------ the snapshot

    def _watch(self) -> None:
        db = None
        while not self._stop.is_set():
            try:
                if db is None:
                    db = connect(self.url)
                    db.execute(f"LISTEN {CHANNEL}")
                    self._generation += 1
                    self._checked(db)
                    self._set_up()
                for _ in db.notifies(timeout=self.check_every_s, stop_after=1):
                    pass
                if self._checked(db) and self.on_change is not None:
                    self.on_change()
            except psycopg.Error as exc:
                self._set_down(one_line(exc))
                if db is not None:
                    db.close()
                db = None
                self._stop.wait(RETRY_S)
        if db is not None:
            db.close()

    def _checked(self, db: psycopg.Connection) -> bool:
        """The watcher's refresh, cut off when the database does not answer in time."""
        cut = threading.Event()

        def no_answer() -> None:
            cut.set()
            abort(db)

        timer = threading.Timer(WATCH_TIMEOUT_S, no_answer)
        timer.daemon = True
        timer.start()
        try:
            return self._refresh(db)
        except psycopg.Error:
            if cut.is_set():
                raise psycopg.OperationalError(f"no answer within {WATCH_TIMEOUT_S:g} s") from None
            raise
        finally:
            timer.cancel()

    def _refresh(self, db: psycopg.Connection) -> bool:
        """Re-read what changed since the snapshot (by the counters); True when anything did."""
        with self._refreshing:
            old = self._snap
            counts = dict(db.execute("SELECT what, n FROM changes").fetchall())
            if counts == old.counts:
                return False
            if {k for k in counts if counts[k] != old.counts.get(k)} == {"clusters"}:
                self._snap = replace(old, counts=counts)  # the cluster stores look at it themselves
                return False
            snap = old
            if counts.get("speakers") != old.counts.get("speakers"):
                snap = self._read_enrollments(db, snap)
            if counts.get("words") != old.counts.get("words"):
                snap = replace(snap, words=tuple(db.execute(
                    "SELECT vocabulary, digit, model_sha256, vector FROM word_templates ORDER BY id").fetchall()))
            snap = self._read_audit(db, snap)
            self._snap = replace(snap, counts=counts)
            return True

    @staticmethod
    def _read_enrollments(db: psycopg.Connection, snap: Snapshot) -> Snapshot:
        rows = tuple(db.execute("SELECT e.id, s.name, e.feature_key FROM enrollments e JOIN speakers s "
                                "ON s.id = e.speaker_id ORDER BY s.name, e.id").fetchall())
        need = [eid for eid, _, _ in rows if eid not in snap.features]
        fresh = {eid: from_blob(blob, dims) for eid, blob, dims in db.execute(
            "SELECT id, features, dims FROM enrollments WHERE id = ANY(%s)", (need,)).fetchall()} if need else {}
        features = {eid: snap.features.get(eid, fresh.get(eid)) for eid, _, _ in rows}
        rows = tuple(r for r in rows if features[r[0]] is not None)  # removed between the two reads
        return replace(snap, version=snap.version + 1, enrollments=rows,
                       features={k: v for k, v in features.items() if v is not None})

    @staticmethod
    def _read_audit(db: psycopg.Connection, snap: Snapshot) -> Snapshot:
        if snap.audit_floor is None:
            floor = db.execute("SELECT COALESCE(MAX(id), 0) FROM audit").fetchone()[0]
            return replace(snap, audit_floor=floor, audit=())
        last = snap.audit[-1]["audit"] if snap.audit else snap.audit_floor
        rows = db.execute("SELECT id, time, who, action, subject, name, old_name, detail FROM audit "
                          "WHERE id > %s ORDER BY id LIMIT %s", (last, AUDIT_TAIL)).fetchall()
        fresh = [audit_entry(*r) for r in rows]
        removed = {e["subject"] for e in fresh if e["action"] == "remove"}  # their names go from memory too
        tail = tuple({**e, "name": None, **({"from": None} if "from" in e else {})} if e["subject"] in removed else e
                     for e in (*snap.audit, *fresh))
        floor = snap.audit_floor
        if len(tail) > AUDIT_TAIL:
            floor, tail = tail[-AUDIT_TAIL - 1]["audit"], tail[-AUDIT_TAIL:]
        return replace(snap, audit_floor=floor, audit=tail)

    def invalidate(self) -> None:
        self._seen = None

    def changed(self) -> bool:
        """True when the speakers changed (on any node) since the last call; reads memory only."""
        version = self._snap.version
        changed, self._seen = version != self._seen, version
        return changed

    def enrollment_ids(self, feature_key: str) -> dict[str, tuple[int, ...]]:
        out: dict[str, list[int]] = {}
        for eid, name, key in self._snap.enrollments:
            if key == feature_key:
                out.setdefault(name, []).append(eid)
        return {name: tuple(ids) for name, ids in out.items()}

    def enrollment_features(self, ids: tuple[int, ...]) -> list[np.ndarray]:
        features = self._snap.features
        return [features[eid] for eid in ids if eid in features]

    def clusters_version(self) -> int:
        """The database's count of cluster changes as last read (-1: not known yet)."""
        return self._snap.counts.get("clusters", -1)

    def word_rows(self) -> tuple[int, tuple]:
        """The word templates as last read, and the counter they reflect."""
        snap = self._snap
        return snap.counts.get("words", -1), snap.words

    # ------------------------------------------------------------------ speakers

    def speaker_id(self, name: str) -> int | None:
        row = self.using("read the gallery", lambda db: db.execute(
            "SELECT id FROM speakers WHERE name = %s", (name,)).fetchone())
        return row[0] if row else None

    def add_enrollments(self, name: str, utterances: list[Utterance], vectors: np.ndarray,
                        model_sha256: str, feature_key: str, source: str, who: str = "local") -> None:
        name = validate_name(name)
        now = time.time()

        def work(db: psycopg.Connection) -> None:
            (sid,) = db.execute("INSERT INTO speakers(name, created, updated) VALUES (%s, %s, %s) ON CONFLICT (name) "
                                "DO UPDATE SET updated = EXCLUDED.updated RETURNING id", (name, now, now)).fetchone()
            for utt, vec in zip(utterances, vectors):
                (eid,) = db.execute(
                    "INSERT INTO enrollments(speaker_id, features, dims, feature_key, seconds, source, created) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    (sid, to_blob(utt.features), utt.features.shape[1], feature_key, utt.seconds, source, now)).fetchone()
                db.execute("INSERT INTO embeddings(enrollment_id, model_sha256, vector) VALUES (%s, %s, %s)",
                           (eid, model_sha256, to_blob(vec)))
            action, detail = enrollment_audit(source, utterances)
            self._audit(db, who, action, sid, name, detail=detail, now=now)

        self.changing(f"enroll {name!r}", work)

    def remove(self, name: str, who: str = "local") -> bool:
        return self.remove_speaker(name, who) is not None

    def remove_speaker(self, name: str, who: str = "local", clusters: tuple[int, ...] = (),
                       features: tuple[bytes, ...] = ()) -> list[int] | None:
        """The speaker's rows, the cluster members stored with their enrolled ``features``,
        clusters left empty and the ``clusters`` of their voice: one transaction."""
        def work(db: psycopg.Connection) -> list[int] | None:
            row = db.execute("SELECT id FROM speakers WHERE name = %s FOR UPDATE", (name,)).fetchone()
            if row is None:
                return None
            sid = row[0]
            subject = self._subject(db, sid)
            n, seconds = db.execute("SELECT COUNT(*), COALESCE(SUM(seconds), 0) FROM enrollments "
                                    "WHERE speaker_id = %s", (sid,)).fetchone()
            db.execute("DELETE FROM speakers WHERE id = %s", (sid,))
            touched = {cid for (cid,) in db.execute(
                "DELETE FROM cluster_members WHERE features = ANY(%s) RETURNING cluster_id", (list(features),))}
            emptied = {cid for cid in touched if db.execute(
                "SELECT 1 FROM cluster_members WHERE cluster_id = %s LIMIT 1", (cid,)).fetchone() is None}
            gone = sorted({*clusters, *emptied})
            db.execute("DELETE FROM clusters WHERE id = ANY(%s)", (gone,))
            db.execute("UPDATE audit SET name = NULL, old_name = NULL WHERE subject = %s", (subject,))
            self._audit(db, who, "remove", None, None, subject=subject,
                        detail={"enrollments": n, "seconds": round(seconds, 2)})
            return gone

        return self.changing(f"remove {name!r}", work)

    def rename(self, old: str, new: str, who: str = "local") -> None:
        new = validate_name(new)

        def work(db: psycopg.Connection) -> None:
            row = db.execute("SELECT id FROM speakers WHERE name = %s", (old,)).fetchone()
            if row is None:
                raise GalleryError(f"no enrolled speaker named {old!r}")
            if db.execute("SELECT 1 FROM speakers WHERE name = %s", (new,)).fetchone():
                raise GalleryError(f"a speaker named {new!r} is already enrolled")
            db.execute("UPDATE speakers SET name = %s, updated = %s WHERE id = %s", (new, time.time(), row[0]))
            self._audit(db, who, "rename", row[0], new, old_name=old)

        self.changing(f"rename {old!r}", work)

    def erase(self) -> bool:
        """VACUUM the tables a removal touches, so the deleted rows' space is reclaimed now
        rather than when autovacuum comes. The database's WAL, its replicas and its backups keep
        what they held as long as their retention says (docs/operations.md, "Shared gallery")."""
        def vacuum(db: psycopg.Connection) -> None:
            db.execute("VACUUM speakers, enrollments, embeddings, subjects, audit, clusters, cluster_members, "
                       "cluster_embeddings")

        try:
            self.using("vacuum the gallery", vacuum)
        except StorageError as exc:
            log.warning("%s; the removed rows' space is reclaimed by autovacuum later", exc)
            return False
        return True

    # ------------------------------------------------------------------ audit trail and export

    @staticmethod
    def _subject(db: psycopg.Connection, sid: int) -> str:
        row = db.execute("SELECT subject FROM subjects WHERE speaker_id = %s", (sid,)).fetchone()
        if row:
            return row[0]
        subject = secrets.token_hex(6)
        db.execute("INSERT INTO subjects(speaker_id, subject) VALUES (%s, %s)", (sid, subject))
        return subject

    def _audit(self, db: psycopg.Connection, who: str, action: str, sid: int | None, name: str | None,
               old_name: str | None = None, subject: str | None = None, detail: dict | None = None,
               now: float | None = None) -> None:
        if subject is None:
            subject = self._subject(db, sid)
        db.execute("INSERT INTO audit(time, who, action, subject, name, old_name, detail) "
                   "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                   (now or time.time(), who, action, subject, name, old_name, json.dumps(detail or {})))

    def audit(self, after: int = 0, subject: str | None = None, limit: int = 100000) -> list[dict]:
        """The newest entries come from memory (the daemon asks every half second); older
        ones, or one subject's, from the database."""
        snap = self._snap
        if subject is None and snap.audit_floor is not None and after >= snap.audit_floor:
            return [e for e in snap.audit if e["audit"] > after][:limit]
        where, args = ("id > %s", (after,)) if subject is None else ("id > %s AND subject = %s", (after, subject))
        rows = self.using("read the audit trail", lambda db: db.execute(
            f"SELECT id, time, who, action, subject, name, old_name, detail FROM audit WHERE {where} "
            "ORDER BY id LIMIT %s", (*args, limit)).fetchall())
        return [audit_entry(*row) for row in rows]

    def last_audit(self) -> int:
        snap = self._snap
        if snap.audit_floor is None:
            raise StorageError(f"gallery unavailable: cannot read the audit trail: {self._down}")
        return snap.audit[-1]["audit"] if snap.audit else snap.audit_floor

    def export(self, name: str) -> dict:
        def read(db: psycopg.Connection) -> dict:
            row = db.execute("SELECT id, name, created, updated FROM speakers WHERE name = %s", (name,)).fetchone()
            if row is None:
                raise GalleryError(f"no enrolled speaker named {name!r}")
            subject = db.execute("SELECT subject FROM subjects WHERE speaker_id = %s", (row[0],)).fetchone()
            enrollments = []
            for eid, blob, dims, key, seconds, source, created in db.execute(
                    "SELECT id, features, dims, feature_key, seconds, source, created FROM enrollments "
                    "WHERE speaker_id = %s ORDER BY id", (row[0],)).fetchall():
                vectors = db.execute("SELECT model_sha256, vector FROM embeddings WHERE enrollment_id = %s "
                                     "ORDER BY model_sha256", (eid,)).fetchall()
                enrollments.append({
                    "source": source, "seconds": round(seconds, 3), "created": created, "feature_key": key,
                    "features": array_json(from_blob(blob, dims)),
                    "embeddings": [{"model_sha256": sha, "vector": from_blob(v).tolist()} for sha, v in vectors]})
            return {"name": row[1], "subject": subject[0] if subject else None, "created": row[2],
                    "updated": row[3], "enrollments": enrollments}

        out = self.using(f"export {name!r}", read)
        out["audit"] = self.audit(subject=out["subject"]) if out["subject"] else []
        return out

    def speakers(self) -> list[SpeakerEntry]:
        rows = self.using("list the speakers", lambda db: db.execute(
            "SELECT s.name, COUNT(e.id), COALESCE(SUM(e.seconds), 0), s.created, s.updated FROM speakers s "
            "LEFT JOIN enrollments e ON e.speaker_id = s.id GROUP BY s.id ORDER BY s.name").fetchall())
        return [SpeakerEntry(*row) for row in rows]

    def embeddings(self, model_sha256: str) -> dict[str, np.ndarray]:
        rows = self.using("read the embeddings", lambda db: db.execute(
            "SELECT s.name, m.vector FROM embeddings m JOIN enrollments e ON e.id = m.enrollment_id "
            "JOIN speakers s ON s.id = e.speaker_id WHERE m.model_sha256 = %s ORDER BY s.name, e.id",
            (model_sha256,)).fetchall())
        out: dict[str, list[np.ndarray]] = {}
        for name, blob in rows:
            out.setdefault(name, []).append(from_blob(blob))
        return {k: np.stack(v) for k, v in out.items()}

    def feature_blobs(self, name: str) -> list[bytes]:
        return [bytes(b) for (b,) in self.using("read the enrollments", lambda db: db.execute(
            "SELECT e.features FROM enrollments e JOIN speakers s ON s.id = e.speaker_id WHERE s.name = %s",
            (name,)).fetchall())]

    # ------------------------------------------------------------------ re-embedding

    def missing_embeddings(self, model_sha256: str, feature_key: str) -> list[tuple[int, np.ndarray]]:
        rows = self.using("read the enrollments", lambda db: db.execute(
            "SELECT e.id, e.features, e.dims FROM enrollments e WHERE e.feature_key = %s AND NOT EXISTS "
            "(SELECT 1 FROM embeddings m WHERE m.enrollment_id = e.id AND m.model_sha256 = %s)",
            (feature_key, model_sha256)).fetchall())
        return [(eid, from_blob(blob, dims)) for eid, blob, dims in rows]

    def stale_enrollments(self, feature_key: str) -> int:
        return self.using("read the enrollments", lambda db: db.execute(
            "SELECT COUNT(*) FROM enrollments WHERE feature_key != %s", (feature_key,)).fetchone()[0])

    def store_embeddings(self, model_sha256: str, vectors: list[tuple[int, np.ndarray]]) -> None:
        def work(db: psycopg.Connection) -> None:
            with db.cursor() as cur:
                cur.executemany("INSERT INTO embeddings(enrollment_id, model_sha256, vector) VALUES (%s, %s, %s) "
                                "ON CONFLICT (enrollment_id, model_sha256) DO UPDATE SET vector = EXCLUDED.vector",
                                [(eid, model_sha256, to_blob(v)) for eid, v in vectors])
            db.execute("DELETE FROM embeddings WHERE model_sha256 != %s", (model_sha256,))

        self.changing("store re-embedded enrollments", work)

    # ------------------------------------------------------------------ beside the speakers

    def cluster_store(self):
        from streamd.identity.pg_clusters import PgClusterStore

        return PgClusterStore(self)

    def word_store(self):
        from streamd.identity.pg_clusters import PgWordStore

        return PgWordStore(self)
