"""The speaker gallery: SQLite in the state directory (WAL, one transaction per change).

It keeps every enrollment's features, not only its embeddings, so that when the speaker model
changes the gallery is re-embedded at start-up instead of silently scoring across models.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
"""
UNKNOWN = "unknown"


class GalleryError(RuntimeError):
    """Enrollment or a gallery change was refused; the message says why."""


@dataclass(frozen=True)
class Utterance:
    """One utterance's normalised speaker features, as stored for enrollment, and the
    level of its audio (checked by the enrollment quality gates, not stored)."""

    features: np.ndarray  # (frames, dims) float32
    seconds: float
    peak: float = 0.0  # largest |sample| / 32768
    clipped: float = 0.0  # share of samples at full scale
    rms_dbfs: float = -100.0


def audio_level(audio: np.ndarray) -> tuple[float, float, float]:
    """(peak, clipped share, RMS in dBFS) of int16 audio."""
    if len(audio) == 0:
        return 0.0, 0.0, -100.0
    a = np.abs(audio.astype(np.int32))
    rms = float(np.sqrt(np.mean((audio.astype(np.float64) / 32768.0) ** 2)))
    return float(a.max()) / 32768.0, float(np.mean(a >= 32767)), 20 * np.log10(max(rms, 1e-5))


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


def from_blob(blob: bytes, dims: int | None = None) -> np.ndarray:
    a = np.frombuffer(blob, dtype="<f4")
    return a.reshape(-1, dims) if dims else a


class Gallery:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # an acknowledged enrollment survives power loss
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._version: int | None = None

    def close(self) -> None:
        self.db.close()

    def transaction(self):
        """``with gallery.transaction():`` — BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error."""
        return Transaction(self.db)

    def invalidate(self) -> None:
        """Make the next ``changed()`` true (SIGHUP: re-read everything)."""
        self._version = None

    def changed(self) -> bool:
        """True when the database changed (in any connection) since the last call."""
        (version,) = self.db.execute("PRAGMA data_version").fetchone()
        total = self.db.total_changes
        key = hash((version, total))
        changed = key != self._version
        self._version = key
        return changed

    # ------------------------------------------------------------------ speakers

    def speaker_id(self, name: str) -> int | None:
        row = self.db.execute("SELECT id FROM speakers WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def add_enrollments(self, name: str, utterances: list[Utterance], vectors: np.ndarray,
                        model_sha256: str, feature_key: str, source: str) -> None:
        """Add utterances (and their embeddings for the current model) to a speaker, creating it."""
        name = validate_name(name)
        now = time.time()
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

    def remove(self, name: str) -> bool:
        with self.transaction():
            cur = self.db.execute("DELETE FROM speakers WHERE name = ?", (name,))
        return cur.rowcount > 0

    def rename(self, old: str, new: str) -> None:
        new = validate_name(new)
        with self.transaction():
            if self.speaker_id(old) is None:
                raise GalleryError(f"no enrolled speaker named {old!r}")
            if self.speaker_id(new) is not None:
                raise GalleryError(f"a speaker named {new!r} is already enrolled")
            self.db.execute("UPDATE speakers SET name = ?, updated = ? WHERE name = ?", (new, time.time(), old))

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
        with self.transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO embeddings(enrollment_id, model_sha256, vector) VALUES (?, ?, ?)",
                [(eid, model_sha256, to_blob(v)) for eid, v in vectors])
            self.db.execute("DELETE FROM embeddings WHERE model_sha256 != ?", (model_sha256,))


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
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
