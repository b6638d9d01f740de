"""Storage of unknown-voice clusters, in the gallery's SQLite file.

Its own connection with synchronous=NORMAL: in WAL mode a power cut may lose the last unknown
utterances but never corrupts the file, and the audio thread does not wait for an fsync per
unknown utterance. Enrollments keep the gallery connection's synchronous=FULL.
Cluster ids come from AUTOINCREMENT, so a label (``unknown-3``) is never reused.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from streamd.identity.gallery import from_blob, raises_storage_error, to_blob, Transaction

from streamd.identity.scoring import Utterance

SCHEMA = """
CREATE TABLE IF NOT EXISTS clusters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    heard INTEGER NOT NULL DEFAULT 0,   -- utterances assigned, including ones no longer kept
    seconds REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS cluster_members (
    id INTEGER PRIMARY KEY,
    cluster_id INTEGER NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
    features BLOB NOT NULL,
    dims INTEGER NOT NULL,
    feature_key TEXT NOT NULL,
    seconds REAL NOT NULL,
    peak REAL NOT NULL,
    clipped REAL NOT NULL,
    rms_dbfs REAL NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cluster_embeddings (
    member_id INTEGER NOT NULL REFERENCES cluster_members(id) ON DELETE CASCADE,
    model_sha256 TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (member_id, model_sha256)
);
CREATE INDEX IF NOT EXISTS cluster_members_by_cluster ON cluster_members(cluster_id);
"""


@raises_storage_error
class ClusterStore:
    """``uri``: the read-only URI of a gallery that cannot be written (Gallery.uri); the
    clusters are then read, and every change raises StorageError (SQLITE_READONLY), which
    callers on the audio path log and pass over. (streamd.identity.pg_clusters is the
    PostgreSQL sibling, with the same public methods.)"""

    def __init__(self, path: Path, uri: str | None = None):
        self.path = path
        if uri is not None:
            self.db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=5.0)
            self.db.execute("SELECT COUNT(*) FROM clusters").fetchone()  # no such table: not usable
            return
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA secure_delete=ON")  # a dropped voice's utterances are zeroed, not left in free pages
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def new_cluster(self, now: float) -> int:
        """A new, empty cluster's id (the next ``add`` fills it)."""
        with Transaction(self.db):
            return self.db.execute("INSERT INTO clusters(created, updated) VALUES (?, ?)", (now, now)).lastrowid

    def refill(self) -> None:
        pass  # ids come from AUTOINCREMENT, one at a time

    def changed_elsewhere(self) -> bool:
        return False  # another process's changes are read on reload (SIGHUP)

    def updated_times(self) -> dict[int, float]:
        return dict(self.db.execute("SELECT id, updated FROM clusters").fetchall())

    def add(self, cid: int | None, utt: Utterance, vector: np.ndarray, sha: str, key: str,
            max_members: int, now: float, new: bool = False) -> int:
        """Add an utterance to cluster ``cid`` (a new cluster when None); keeps the newest
        ``max_members``. Returns the cluster id. (``new``: made by new_cluster, nothing to do.)"""
        with Transaction(self.db):
            if cid is None:
                cid = self.db.execute("INSERT INTO clusters(created, updated) VALUES (?, ?)", (now, now)).lastrowid
            self.db.execute("UPDATE clusters SET updated = ?, heard = heard + 1, seconds = seconds + ? WHERE id = ?",
                            (now, utt.seconds, cid))
            mid = self.db.execute(
                "INSERT INTO cluster_members(cluster_id, features, dims, feature_key, seconds, peak, clipped, "
                "rms_dbfs, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (cid, to_blob(utt.features), utt.features.shape[1], key, utt.seconds, utt.peak, utt.clipped,
                 utt.rms_dbfs, now)).lastrowid
            self.db.execute("INSERT INTO cluster_embeddings(member_id, model_sha256, vector) VALUES (?, ?, ?)",
                            (mid, sha, to_blob(vector)))
            self._keep_newest(cid, max_members)
        return cid

    def vectors(self, sha: str, cid: int | None = None) -> dict[int, np.ndarray]:
        """{cluster id: (n, dim)} member embeddings for one model (one cluster, or all)."""
        where = "" if cid is None else " AND m.cluster_id = ?"
        rows = self.db.execute(
            "SELECT m.cluster_id, e.vector FROM cluster_embeddings e JOIN cluster_members m ON m.id = e.member_id "
            f"WHERE e.model_sha256 = ?{where} ORDER BY m.cluster_id, m.id",
            (sha,) if cid is None else (sha, cid)).fetchall()
        out: dict[int, list[np.ndarray]] = {}
        for c, blob in rows:
            out.setdefault(c, []).append(from_blob(blob))
        return {c: np.stack(v) for c, v in out.items()}

    def members(self, cid: int, sha: str) -> tuple[list[Utterance], np.ndarray]:
        rows = self.db.execute(
            "SELECT m.features, m.dims, m.seconds, m.peak, m.clipped, m.rms_dbfs, e.vector FROM cluster_members m "
            "JOIN cluster_embeddings e ON e.member_id = m.id AND e.model_sha256 = ? WHERE m.cluster_id = ? "
            "ORDER BY m.id", (sha, cid)).fetchall()
        utts = [Utterance(from_blob(f, d), s, p, c, r) for f, d, s, p, c, r, _ in rows]
        vectors = np.stack([from_blob(v) for *_, v in rows]) if rows else np.zeros((0, 0), np.float32)
        return utts, vectors

    def export(self, cid: int, label: str) -> dict:
        """A cluster as stored (for a speaker's data export): counts, times, each kept
        utterance's features and embeddings."""
        from streamd.identity.gallery import array_json

        created, updated, heard, seconds = self.db.execute(
            "SELECT created, updated, heard, seconds FROM clusters WHERE id = ?", (cid,)).fetchone()
        members = []
        for mid, blob, dims, secs, made in self.db.execute(
                "SELECT id, features, dims, seconds, created FROM cluster_members WHERE cluster_id = ? ORDER BY id",
                (cid,)).fetchall():
            vectors = self.db.execute("SELECT model_sha256, vector FROM cluster_embeddings WHERE member_id = ?",
                                      (mid,)).fetchall()
            members.append({"seconds": round(secs, 3), "created": made, "features": array_json(from_blob(blob, dims)),
                            "embeddings": [{"model_sha256": sha, "vector": from_blob(v).tolist()}
                                           for sha, v in vectors]})
        return {"cluster": label, "created": created, "updated": updated, "heard": heard,
                "seconds": round(seconds, 3), "utterances": members}

    def merge(self, into: int, others: list[int], max_members: int) -> None:
        """Move the utterances of ``others`` into cluster ``into`` and delete them."""
        marks = ",".join("?" * len(others))
        with Transaction(self.db):
            self.db.execute(
                f"UPDATE clusters SET heard = heard + (SELECT COALESCE(SUM(heard), 0) FROM clusters WHERE id IN ({marks})), "
                f"seconds = seconds + (SELECT COALESCE(SUM(seconds), 0) FROM clusters WHERE id IN ({marks})), "
                f"updated = MAX(updated, (SELECT MAX(updated) FROM clusters WHERE id IN ({marks}))) WHERE id = ?",
                (*others, *others, *others, into))
            self.db.execute(f"UPDATE cluster_members SET cluster_id = ? WHERE cluster_id IN ({marks})", (into, *others))
            self.db.execute(f"DELETE FROM clusters WHERE id IN ({marks})", others)
            self._keep_newest(into, max_members)

    def _keep_newest(self, cid: int, max_members: int) -> None:
        self.db.execute(
            "DELETE FROM cluster_members WHERE cluster_id = ? AND id NOT IN "
            "(SELECT id FROM cluster_members WHERE cluster_id = ? ORDER BY id DESC LIMIT ?)",
            (cid, cid, max_members))

    def delete(self, cid: int) -> bool:
        with Transaction(self.db):
            return self.db.execute("DELETE FROM clusters WHERE id = ?", (cid,)).rowcount > 0

    def drop_utterances(self, features: list[bytes]) -> tuple[set[int], set[int]]:
        """Delete the members whose features are these (the same utterances, stored again when
        they were enrolled); a cluster left without members goes too. Returns the clusters
        changed and, of them, those deleted."""
        with Transaction(self.db):
            changed: set[int] = set()
            for blob in features:
                rows = self.db.execute("SELECT id, cluster_id FROM cluster_members WHERE features = ?",
                                       (blob,)).fetchall()
                for mid, cid in rows:
                    self.db.execute("DELETE FROM cluster_members WHERE id = ?", (mid,))
                    changed.add(cid)
            emptied = {cid for cid in changed if self.db.execute(
                "SELECT 1 FROM cluster_members WHERE cluster_id = ? LIMIT 1", (cid,)).fetchone() is None}
            for cid in emptied:
                self.db.execute("DELETE FROM clusters WHERE id = ?", (cid,))
        return changed, emptied

    def least_recent(self) -> int | None:
        row = self.db.execute("SELECT id FROM clusters ORDER BY updated, id LIMIT 1").fetchone()
        return row[0] if row else None

    def listing(self) -> list[dict]:
        rows = self.db.execute(
            "SELECT c.id, c.heard, c.seconds, c.created, c.updated, COUNT(m.id), COALESCE(SUM(m.seconds), 0) "
            "FROM clusters c LEFT JOIN cluster_members m ON m.cluster_id = c.id GROUP BY c.id ORDER BY c.id")
        return [{"cluster": f"unknown-{cid}", "heard": heard, "seconds": round(secs, 2), "kept": kept,
                 "kept_seconds": round(kept_secs, 2), "created": created, "updated": updated}
                for cid, heard, secs, created, updated, kept, kept_secs in rows]

    # ------------------------------------------------------------------ model changes

    def drop_other_features(self, key: str) -> int:
        with Transaction(self.db):
            n = self.db.execute("DELETE FROM cluster_members WHERE feature_key != ?", (key,)).rowcount
            self.db.execute("DELETE FROM clusters WHERE id NOT IN (SELECT cluster_id FROM cluster_members)")
        return n

    def missing_embeddings(self, sha: str) -> list[tuple[int, np.ndarray]]:
        rows = self.db.execute(
            "SELECT m.id, m.features, m.dims FROM cluster_members m WHERE NOT EXISTS "
            "(SELECT 1 FROM cluster_embeddings e WHERE e.member_id = m.id AND e.model_sha256 = ?)", (sha,)).fetchall()
        return [(mid, from_blob(blob, dims)) for mid, blob, dims in rows]

    def store_embeddings(self, sha: str, vectors: list[tuple[int, np.ndarray]]) -> None:
        with Transaction(self.db):
            self.db.executemany("INSERT OR REPLACE INTO cluster_embeddings(member_id, model_sha256, vector) "
                                "VALUES (?, ?, ?)", [(mid, sha, to_blob(v)) for mid, v in vectors])
            self.db.execute("DELETE FROM cluster_embeddings WHERE model_sha256 != ?", (sha,))
