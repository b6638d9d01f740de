"""The unknown-voice clusters and the word templates of a PostgreSQL gallery: the same public
methods as streamd.identity.cluster_store.ClusterStore and word_store.SqliteWordStore, on the
gallery's work connection (PgGallery.using: StorageError for every failure, at once while the
database is away).

Clusters are shared: each write reads the clusters' change counter (schema ``changes``) before
and after it, so the store knows when another node (or a removal) changed them, and the
daemon's cluster writer then re-reads them (UnknownClusters.poll). The writes and those
re-reads run on a connection of their own (a ``Lane``), off the commands' one; listing,
promotion and export use the commands'.

A new cluster's id is reserved from the table's sequence ahead of time (``new_cluster`` takes
one from memory; the daemon's writer refills them), so an unknown voice is labelled at once and
its row written later. Ids a node reserved and did not use are skipped: labels may jump.
"""

from __future__ import annotations

import threading

import numpy as np
import psycopg

from streamd.identity.gallery import array_json, from_blob, to_blob
from streamd.identity.pg_gallery import PgGallery
from streamd.identity.scoring import Utterance


RESERVE = 16  # cluster ids reserved at a time; refilled below half


class PgClusterStore:
    def __init__(self, gallery: PgGallery):
        self.gallery = gallery
        self.path = gallery.path
        self._lane = gallery.lane()
        self._known: int | None = None  # the change counter after this store's last write or read
        self._elsewhere = False  # another writer changed the clusters since
        self._ids: list[int] = []  # reserved cluster ids
        self._ids_lock = threading.Lock()

    def close(self) -> None:
        pass  # the gallery closes its connections

    def _do(self, action: str, work, commands: bool = False):
        """``work(db)`` in a transaction; on the store's own connection, or the commands'."""
        def in_transaction(db: psycopg.Connection):
            with db.transaction():
                return work(db)

        return self.gallery.using(action, in_transaction, None if commands else self._lane)

    def _write(self, action: str, work):
        """A change, noting whether anyone else changed the clusters since this store last looked
        (the counter's row lock orders the writers of every node)."""
        def counted(db: psycopg.Connection):
            before = db.execute("SELECT n FROM changes WHERE what = 'clusters' FOR UPDATE").fetchone()[0]
            out = work(db)
            after = db.execute("SELECT n FROM changes WHERE what = 'clusters'").fetchone()[0]
            self._elsewhere = self._elsewhere or before != self._known
            self._known = after
            return out

        return self._do(action, counted)

    def changed_elsewhere(self) -> bool:
        """Whether the clusters were changed by another node (or a removal) since this store's
        last write or read: reads memory only."""
        return self._known is None or self._elsewhere or self.gallery.clusters_version() > self._known

    def new_cluster(self, now: float) -> int | None:
        """A reserved id for a new cluster (written by the next ``add``); None when none is left."""
        with self._ids_lock:
            return self._ids.pop(0) if self._ids else None

    def refill(self) -> None:
        """Reserve more cluster ids when fewer than half are left."""
        with self._ids_lock:
            need = RESERVE - len(self._ids)
        if need < RESERVE // 2:
            return
        ids = self._do("reserve cluster ids", lambda db: [r[0] for r in db.execute(
            "SELECT nextval(pg_get_serial_sequence('clusters', 'id')) FROM generate_series(1, %s)",
            (need,)).fetchall()])
        with self._ids_lock:
            self._ids.extend(ids)

    def add(self, cid: int | None, utt: Utterance, vector: np.ndarray, sha: str, key: str,
            max_members: int, now: float, new: bool = False) -> int:
        """``new``: ``cid`` was reserved (new_cluster) and its row is made now. An utterance for
        a cluster that is gone (promoted or removed on another node meanwhile) is not stored."""
        def work(db: psycopg.Connection) -> int:
            nonlocal cid
            if cid is None:
                (cid,) = db.execute("INSERT INTO clusters(created, updated) VALUES (%s, %s) RETURNING id",
                                    (now, now)).fetchone()
            elif new:  # ON CONFLICT: a retry after a commit whose answer was lost
                db.execute("INSERT INTO clusters(id, created, updated) OVERRIDING SYSTEM VALUE VALUES (%s, %s, %s) "
                           "ON CONFLICT (id) DO NOTHING", (cid, now, now))
            if not db.execute("UPDATE clusters SET updated = %s, heard = heard + 1, seconds = seconds + %s "
                              "WHERE id = %s", (now, utt.seconds, cid)).rowcount:
                return cid
            (mid,) = db.execute(
                "INSERT INTO cluster_members(cluster_id, features, dims, feature_key, seconds, peak, clipped, "
                "rms_dbfs, created) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (cid, to_blob(utt.features), utt.features.shape[1], key, utt.seconds, utt.peak, utt.clipped,
                 utt.rms_dbfs, now)).fetchone()
            db.execute("INSERT INTO cluster_embeddings(member_id, model_sha256, vector) VALUES (%s, %s, %s)",
                       (mid, sha, to_blob(vector)))
            self._keep_newest(db, cid, max_members)
            return cid

        return self._write("store an unknown voice", work)

    def vectors(self, sha: str, cid: int | None = None) -> dict[int, np.ndarray]:
        where = "" if cid is None else " AND m.cluster_id = %s"

        def read(db: psycopg.Connection) -> list[tuple]:
            if cid is None:  # all of them: what the counter says is in them now
                self._known = db.execute("SELECT n FROM changes WHERE what = 'clusters'").fetchone()[0]
                self._elsewhere = False
            return db.execute(
                "SELECT m.cluster_id, e.vector FROM cluster_embeddings e JOIN cluster_members m ON m.id = e.member_id "
                f"WHERE e.model_sha256 = %s{where} ORDER BY m.cluster_id, m.id",
                (sha,) if cid is None else (sha, cid)).fetchall()

        rows = self._do("read the clusters", read)
        out: dict[int, list[np.ndarray]] = {}
        for c, blob in rows:
            out.setdefault(c, []).append(from_blob(blob))
        return {c: np.stack(v) for c, v in out.items()}

    def updated_times(self) -> dict[int, float]:
        return dict(self._do("read the clusters", lambda db: db.execute("SELECT id, updated FROM clusters").fetchall()))

    def members(self, cid: int, sha: str) -> tuple[list[Utterance], np.ndarray]:
        rows = self._do("read a cluster", lambda db: db.execute(
            "SELECT m.features, m.dims, m.seconds, m.peak, m.clipped, m.rms_dbfs, e.vector FROM cluster_members m "
            "JOIN cluster_embeddings e ON e.member_id = m.id AND e.model_sha256 = %s WHERE m.cluster_id = %s "
            "ORDER BY m.id", (sha, cid)).fetchall(), commands=True)
        utts = [Utterance(from_blob(f, d), s, p, c, r) for f, d, s, p, c, r, _ in rows]
        vectors = np.stack([from_blob(v) for *_, v in rows]) if rows else np.zeros((0, 0), np.float32)
        return utts, vectors

    def export(self, cid: int, label: str) -> dict:
        def read(db: psycopg.Connection) -> dict:
            created, updated, heard, seconds = db.execute(
                "SELECT created, updated, heard, seconds FROM clusters WHERE id = %s", (cid,)).fetchone()
            members = []
            for mid, blob, dims, secs, made in db.execute(
                    "SELECT id, features, dims, seconds, created FROM cluster_members WHERE cluster_id = %s "
                    "ORDER BY id", (cid,)).fetchall():
                vectors = db.execute("SELECT model_sha256, vector FROM cluster_embeddings WHERE member_id = %s",
                                     (mid,)).fetchall()
                members.append({"seconds": round(secs, 3), "created": made,
                                "features": array_json(from_blob(blob, dims)),
                                "embeddings": [{"model_sha256": sha, "vector": from_blob(v).tolist()}
                                               for sha, v in vectors]})
            return {"cluster": label, "created": created, "updated": updated, "heard": heard,
                    "seconds": round(seconds, 3), "utterances": members}

        return self._do(f"export {label}", read, commands=True)

    def merge(self, into: int, others: list[int], max_members: int) -> None:
        def work(db: psycopg.Connection) -> None:
            db.execute(
                "UPDATE clusters SET heard = heard + (SELECT COALESCE(SUM(heard), 0) FROM clusters WHERE id = ANY(%s)), "
                "seconds = seconds + (SELECT COALESCE(SUM(seconds), 0) FROM clusters WHERE id = ANY(%s)), "
                "updated = GREATEST(updated, (SELECT MAX(updated) FROM clusters WHERE id = ANY(%s))) WHERE id = %s",
                (others, others, others, into))
            db.execute("UPDATE cluster_members SET cluster_id = %s WHERE cluster_id = ANY(%s)", (into, others))
            db.execute("DELETE FROM clusters WHERE id = ANY(%s)", (others,))
            self._keep_newest(db, into, max_members)

        self._write("merge clusters", work)

    @staticmethod
    def _keep_newest(db: psycopg.Connection, cid: int, max_members: int) -> None:
        db.execute("DELETE FROM cluster_members WHERE cluster_id = %s AND id NOT IN "
                   "(SELECT id FROM cluster_members WHERE cluster_id = %s ORDER BY id DESC LIMIT %s)",
                   (cid, cid, max_members))

    def delete(self, cid: int) -> bool:
        return self._write("delete a cluster", lambda db: db.execute(
            "DELETE FROM clusters WHERE id = %s", (cid,)).rowcount > 0)

    def drop_utterances(self, features: list[bytes]) -> tuple[set[int], set[int]]:
        def work(db: psycopg.Connection) -> tuple[set[int], set[int]]:
            changed = {cid for (cid,) in db.execute(
                "DELETE FROM cluster_members WHERE features = ANY(%s) RETURNING cluster_id", (list(features),))}
            emptied = {cid for cid in changed if db.execute(
                "SELECT 1 FROM cluster_members WHERE cluster_id = %s LIMIT 1", (cid,)).fetchone() is None}
            db.execute("DELETE FROM clusters WHERE id = ANY(%s)", (sorted(emptied),))
            return changed, emptied

        return self._write("drop utterances from clusters", work)

    def least_recent(self) -> int | None:
        row = self._do("read the clusters", lambda db: db.execute(
            "SELECT id FROM clusters ORDER BY updated, id LIMIT 1").fetchone())
        return row[0] if row else None

    def listing(self) -> list[dict]:
        rows = self._do("list the clusters", lambda db: db.execute(
            "SELECT c.id, c.heard, c.seconds, c.created, c.updated, COUNT(m.id), COALESCE(SUM(m.seconds), 0) "
            "FROM clusters c LEFT JOIN cluster_members m ON m.cluster_id = c.id GROUP BY c.id ORDER BY c.id").fetchall(),
            commands=True)
        return [{"cluster": f"unknown-{cid}", "heard": heard, "seconds": round(secs, 2), "kept": kept,
                 "kept_seconds": round(kept_secs, 2), "created": created, "updated": updated}
                for cid, heard, secs, created, updated, kept, kept_secs in rows]

    def drop_other_features(self, key: str) -> int:
        def work(db: psycopg.Connection) -> int:
            n = db.execute("DELETE FROM cluster_members WHERE feature_key != %s", (key,)).rowcount
            db.execute("DELETE FROM clusters c WHERE NOT EXISTS (SELECT 1 FROM cluster_members m "
                       "WHERE m.cluster_id = c.id)")
            return n

        return self._write("drop clusters of other features", work)

    def missing_embeddings(self, sha: str) -> list[tuple[int, np.ndarray]]:
        rows = self._do("read the clusters", lambda db: db.execute(
            "SELECT m.id, m.features, m.dims FROM cluster_members m WHERE NOT EXISTS "
            "(SELECT 1 FROM cluster_embeddings e WHERE e.member_id = m.id AND e.model_sha256 = %s)", (sha,)).fetchall())
        return [(mid, from_blob(blob, dims)) for mid, blob, dims in rows]

    def store_embeddings(self, sha: str, vectors: list[tuple[int, np.ndarray]]) -> None:
        def work(db: psycopg.Connection) -> None:
            with db.cursor() as cur:
                cur.executemany("INSERT INTO cluster_embeddings(member_id, model_sha256, vector) VALUES (%s, %s, %s) "
                                "ON CONFLICT (member_id, model_sha256) DO UPDATE SET vector = EXCLUDED.vector",
                                [(mid, sha, to_blob(v)) for mid, v in vectors])
            db.execute("DELETE FROM cluster_embeddings WHERE model_sha256 != %s", (sha,))

        self._write("store re-embedded clusters", work)


class PgWordStore:
    """The word templates; what the audio path reads (``version``, ``vectors``) is the
    gallery's snapshot in memory."""

    def __init__(self, gallery: PgGallery):
        self.gallery = gallery

    def prepare(self) -> None:
        pass  # the gallery's schema has the table

    def version(self) -> int:
        return self.gallery.word_rows()[0]

    def vectors(self, sha: str) -> list[tuple[str, int, bytes]]:
        return [(v, d, bytes(b)) for v, d, s, b in self.gallery.word_rows()[1] if s == sha]

    def add(self, vocabulary: str, rows: list[tuple]) -> None:
        def work(db: psycopg.Connection) -> None:
            with db.cursor() as cur:
                cur.executemany("INSERT INTO word_templates(vocabulary, digit, input, model_sha256, vector, source, "
                                "created) VALUES (%s, %s, %s, %s, %s, %s, %s)", rows)

        self.gallery.changing(f"enroll words of {vocabulary!r}", work)

    def count(self, vocabulary: str, digit: int) -> int:
        return self.gallery.using("read the word templates", lambda db: db.execute(
            "SELECT COUNT(*) FROM word_templates WHERE vocabulary = %s AND digit = %s",
            (vocabulary, digit)).fetchone()[0])

    def remove(self, vocabulary: str, digit: int | None) -> int:
        sql, args = "DELETE FROM word_templates WHERE vocabulary = %s", (vocabulary,)
        if digit is not None:
            sql, args = sql + " AND digit = %s", (vocabulary, digit)
        return self.gallery.changing(f"remove words of {vocabulary!r}", lambda db: db.execute(sql, args).rowcount)

    def counts(self) -> list[tuple[str, int, int]]:
        return self.gallery.using("read the word templates", lambda db: db.execute(
            "SELECT vocabulary, digit, COUNT(*) FROM word_templates GROUP BY vocabulary, digit "
            "ORDER BY vocabulary, digit").fetchall())

    def stale(self, sha: str) -> list[tuple[int, bytes]]:
        return self.gallery.using("read the word templates", lambda db: db.execute(
            "SELECT id, input FROM word_templates WHERE model_sha256 != %s", (sha,)).fetchall())

    def replace_vectors(self, sha: str, vectors: list[tuple[int, bytes]]) -> None:
        def work(db: psycopg.Connection) -> None:
            with db.cursor() as cur:
                cur.executemany("UPDATE word_templates SET vector = %s, model_sha256 = %s WHERE id = %s",
                                [(v, sha, i) for i, v in vectors])

        self.gallery.changing("store re-embedded word templates", work)
