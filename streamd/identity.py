"""Speaker gallery (SQLite) and the open-set decision by cosine score.

Enrollment is data: adding a speaker adds rows, never touches a model.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

UNKNOWN = "unknown"
SCHEMA = """
CREATE TABLE IF NOT EXISTS speakers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS embeddings (
    id INTEGER PRIMARY KEY,
    speaker_id INTEGER NOT NULL REFERENCES speakers(id) ON DELETE CASCADE,
    model_sha256 TEXT NOT NULL,
    vector BLOB NOT NULL,
    seconds REAL NOT NULL,
    source TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class GalleryError(RuntimeError):
    """Enrollment or a gallery change was refused; the message says why."""


@dataclass(frozen=True)
class SpeakerEntry:
    name: str
    embeddings: int
    seconds: float
    created: float
    updated: float


@dataclass(frozen=True)
class Decision:
    speaker: str
    score: float
    candidates: list[dict]


def l2_normalize(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norm, 1e-12)


def validate_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 64:
        raise GalleryError("speaker name must be 1-64 characters")
    if name == UNKNOWN or name.startswith(UNKNOWN + "-"):
        raise GalleryError(f"speaker name {name!r} is reserved")
    if any(ch in name for ch in "/\\") or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise GalleryError("speaker name must not contain control characters or path separators")
    return name


class Gallery:
    """Enrolled speakers in ``gallery.sqlite3`` (WAL mode, one transaction per change)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._version: int | None = None
        self._cache: dict[str, tuple[list[str], np.ndarray]] = {}  # by model sha256

    def close(self) -> None:
        self._db.close()

    def enroll(self, name: str, vectors: np.ndarray, seconds: float, model_sha256: str, source: str) -> None:
        name = validate_name(name)
        now = time.time()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO speakers(name, created, updated) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET updated = excluded.updated", (name, now, now))
            (sid,) = self._db.execute("SELECT id FROM speakers WHERE name = ?", (name,)).fetchone()
            per = seconds / max(1, len(vectors))
            self._db.executemany(
                "INSERT INTO embeddings(speaker_id, model_sha256, vector, seconds, source, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(sid, model_sha256, np.asarray(v, "<f4").tobytes(), per, source, now) for v in vectors])

    def remove(self, name: str) -> bool:
        with self._db:
            cur = self._db.execute("DELETE FROM speakers WHERE name = ?", (name,))
        return cur.rowcount > 0

    def speakers(self) -> list[SpeakerEntry]:
        rows = self._db.execute(
            "SELECT s.name, COUNT(e.id), COALESCE(SUM(e.seconds), 0), s.created, s.updated "
            "FROM speakers s LEFT JOIN embeddings e ON e.speaker_id = s.id GROUP BY s.id ORDER BY s.name")
        return [SpeakerEntry(*row) for row in rows]

    def _changed(self) -> bool:
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        changed = version != self._version
        self._version = version
        return changed

    def centroids(self, model_sha256: str) -> tuple[list[str], np.ndarray]:
        """Each speaker's mean embedding (for this model), re-read when another process
        (``streamd enroll``) changed the database."""
        if self._changed():
            self._cache.clear()
        if model_sha256 not in self._cache:
            self._cache[model_sha256] = self._read_centroids(model_sha256)
        return self._cache[model_sha256]

    def _read_centroids(self, model_sha256: str) -> tuple[list[str], np.ndarray]:
        rows = self._db.execute(
            "SELECT s.name, e.vector FROM embeddings e JOIN speakers s ON s.id = e.speaker_id "
            "WHERE e.model_sha256 = ? ORDER BY s.name", (model_sha256,)).fetchall()
        by_name: dict[str, list[np.ndarray]] = {}
        for name, blob in rows:
            by_name.setdefault(name, []).append(np.frombuffer(blob, "<f4"))
        if not by_name:
            return [], np.zeros((0, 0), np.float32)
        return list(by_name), l2_normalize(np.stack([np.mean(v, axis=0) for v in by_name.values()]))

    def reload(self) -> None:
        self._version = None
        self._cache.clear()


def decide(embedding: np.ndarray, names: list[str], centroids: np.ndarray, threshold: float,
           top: int = 3) -> Decision:
    """Open-set decision: the best-scoring enrolled speaker if its cosine score reaches the
    threshold, otherwise ``unknown``."""
    if not names:
        return Decision(UNKNOWN, 0.0, [])
    scores = centroids @ l2_normalize(np.asarray(embedding, np.float32))
    order = np.argsort(-scores)[:top]
    candidates = [{"name": names[i], "score": float(scores[i])} for i in order]
    best = candidates[0]
    speaker = best["name"] if best["score"] >= threshold else UNKNOWN
    return Decision(speaker, best["score"], candidates)
