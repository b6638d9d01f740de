"""Storage of the word templates taught at run time (streamd.identity.vocabulary), in the
gallery's SQLite file, table ``word_templates``; streamd.identity.pg_gallery has the
PostgreSQL sibling (``PgWordStore``, the same methods). Every method raises StorageError.

A row: the vocabulary, the digit, the word model's input (float16, so a new word model
re-embeds them), the model that made the vector, the vector (float32), the source, the time.
"""

from __future__ import annotations

import sqlite3

from streamd.identity.gallery import Gallery, storage_error

SCHEMA = """
CREATE TABLE IF NOT EXISTS word_templates (
    id INTEGER PRIMARY KEY,
    vocabulary TEXT NOT NULL,
    digit INTEGER NOT NULL CHECK (digit BETWEEN 0 AND 9),
    input BLOB NOT NULL,             -- the word model's input, float16 (FRAMES x FILTERS)
    model_sha256 TEXT NOT NULL,      -- the word model that made vector
    vector BLOB NOT NULL,            -- float32, unit length
    source TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS word_changes (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL);
INSERT OR IGNORE INTO word_changes VALUES (1, 0);
""" + "".join(
    f"CREATE TRIGGER IF NOT EXISTS word_templates_{event.lower()}_counted AFTER {event} ON word_templates "
    "BEGIN UPDATE word_changes SET n = n + 1; END;\n" for event in ("INSERT", "UPDATE", "DELETE"))

Row = tuple  # (vocabulary, digit, input bytes, model sha256, vector bytes, source, created)


class SqliteWordStore:
    def __init__(self, gallery: Gallery):
        self.gallery = gallery

    @property
    def db(self) -> sqlite3.Connection:
        return self.gallery.db

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            if "no such table" in str(exc):  # a read-only gallery made before vocabularies: none
                return []
            raise storage_error(self.gallery.path, "read the word templates", exc) from None

    def _write(self, action: str, sql: str, rows: list[tuple]) -> int:
        try:
            with self.gallery.transaction():
                return self.db.executemany(sql, rows).rowcount
        except sqlite3.Error as exc:
            raise storage_error(self.gallery.path, action, exc) from None

    def prepare(self) -> None:
        try:
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise storage_error(self.gallery.path, "prepare the word templates", exc) from None

    def version(self) -> int:
        """Changes whenever any connection changes the templates."""
        rows = self._rows("SELECT n FROM word_changes")
        return rows[0][0] if rows else -1

    def vectors(self, sha: str) -> list[tuple[str, int, bytes]]:
        return self._rows("SELECT vocabulary, digit, vector FROM word_templates WHERE model_sha256 = ?", (sha,))

    def add(self, vocabulary: str, rows: list[Row]) -> None:
        self._write(f"enroll words of {vocabulary!r}",
                    "INSERT INTO word_templates(vocabulary, digit, input, model_sha256, vector, source, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def count(self, vocabulary: str, digit: int) -> int:
        rows = self._rows("SELECT COUNT(*) FROM word_templates WHERE vocabulary = ? AND digit = ?", (vocabulary, digit))
        return rows[0][0] if rows else 0

    def remove(self, vocabulary: str, digit: int | None) -> int:
        sql, args = "DELETE FROM word_templates WHERE vocabulary = ?", (vocabulary,)
        if digit is not None:
            sql, args = sql + " AND digit = ?", (vocabulary, digit)
        return self._write(f"remove words of {vocabulary!r}", sql, [args])

    def counts(self) -> list[tuple[str, int, int]]:
        return self._rows("SELECT vocabulary, digit, COUNT(*) FROM word_templates GROUP BY vocabulary, digit "
                          "ORDER BY vocabulary, digit")

    def stale(self, sha: str) -> list[tuple[int, bytes]]:
        return self._rows("SELECT id, input FROM word_templates WHERE model_sha256 != ?", (sha,))

    def replace_vectors(self, sha: str, vectors: list[tuple[int, bytes]]) -> None:
        self._write("store re-embedded word templates",
                    "UPDATE word_templates SET vector = ?, model_sha256 = ? WHERE id = ?",
                    [(v, sha, i) for i, v in vectors])
