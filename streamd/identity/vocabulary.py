"""Vocabularies taught at run time: the word model's session and the templates' storage.

Templates live in the state database (the gallery's SQLite file), table ``word_templates``:
the vocabulary, the digit, the word model's input (so a new word model re-embeds them) and
its embedding. Any connection's change is seen by the daemon before its next decision, so
``streamd digits enroll`` works on a running daemon without a restart.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time

import numpy as np

from streamd.identity.gallery import Gallery, GalleryError, StorageError, storage_error
from streamd.models.cards import ModelCard, ModelError, load_card, verified
from streamd.models.providers import session_options
from streamd.signal.features import FILTERS, FRAMES, word_input
from streamd.models.words import BUILTIN, MatchRule, TemplateIndex, WordMatch

log = logging.getLogger(__name__)

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
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
MIN_SPEECH_S = 0.15  # an utterance shorter than this is no word to learn


class WordModel:
    """The pretrained word embedding (``streamd train words`` writes it and its card)."""

    def __init__(self, card: ModelCard, threads: int = 1, max_batch: int = 16):
        import onnxruntime as ort

        self.card = card
        self.max_batch = max_batch
        try:
            self.session = ort.InferenceSession(str(card.model_path), session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for a corrupt file
            raise ModelError(f"{card.model_path}: cannot load word model: {exc}") from None
        self.input_name = self.session.get_inputs()[0].name

    @property
    def sha256(self) -> str:
        return self.card.sha256

    def embed_many(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Unit-length embeddings (n, dim) of word inputs (each (1, FRAMES, FILTERS))."""
        out = []
        for i in range(0, len(inputs), self.max_batch):
            batch = np.stack(inputs[i : i + self.max_batch]).astype(np.float32)
            out.append(self.session.run(None, {self.input_name: batch})[0])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def load_word_model(cfg) -> WordModel | None:
    """The word model the config names (``models.words``; "" turns vocabularies off)."""
    if not cfg.models.words:
        return None
    card = load_card(cfg.path(cfg.models.dir) / cfg.models.words, "words")
    verified(card.model_path, card.sha256)
    return WordModel(card, cfg.models.threads)


def match_rule(model: WordModel) -> MatchRule:
    rule = model.card.data.get("match_rule", {})
    return MatchRule(float(rule.get("min_score", MatchRule.min_score)),
                     float(rule.get("min_margin", MatchRule.min_margin)))


def check_vocabulary(name: object) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name) or name == BUILTIN:
        raise GalleryError(f"vocabulary {name!r}: 1-32 letters, digits, '_', '.' or '-', starting with a letter "
                           f"or digit, and not {BUILTIN!r}")
    return name


def check_digit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 9:
        raise GalleryError(f"digit {value!r}: must be an integer 0-9")
    return value


class WordBook:
    """Templates, their index and the match, over a gallery's database."""

    def __init__(self, gallery: Gallery, model: WordModel):
        self.gallery = gallery
        self.model = model
        self.rule = match_rule(model)
        self._version: int | None = None
        self._index = TemplateIndex([])
        if not gallery.readonly:
            try:
                gallery.db.executescript(SCHEMA)
                self._reembed()
            except sqlite3.Error as exc:
                raise storage_error(gallery.path, "prepare the word templates", exc) from None

    @property
    def db(self) -> sqlite3.Connection:
        return self.gallery.db

    def _changed(self) -> bool:
        try:
            (n,) = self.db.execute("SELECT n FROM word_changes").fetchone()
        except sqlite3.Error:  # a read-only gallery made before vocabularies: none
            n = -1
        changed, self._version = n != self._version, n
        return changed

    def index(self) -> TemplateIndex:
        if self._changed():
            rows = self._rows("SELECT vocabulary, digit, vector FROM word_templates WHERE model_sha256 = ?",
                              (self.model.sha256,))
            self._index = TemplateIndex([(v, d, np.frombuffer(b, np.float32)) for v, d, b in rows])
        return self._index

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            if "no such table" in str(exc):
                return []
            raise storage_error(self.gallery.path, "read the word templates", exc) from None

    @property
    def active(self) -> bool:
        return len(self.index()) > 0

    def match(self, vector: np.ndarray) -> WordMatch | None:
        return self.index().match(vector, self.rule)

    def enroll(self, vocabulary: str, digit: int, audios: list[np.ndarray], source: str) -> dict:
        """Templates from utterances' audio (int16, the VAD's cuts), stored at once."""
        vocabulary, digit = check_vocabulary(vocabulary), check_digit(digit)
        short = [i for i, a in enumerate(audios) if len(a) < MIN_SPEECH_S * 16000]
        if not audios or short:
            raise GalleryError(f"enroll {vocabulary} {digit}: no word heard" if not audios else
                               f"enroll {vocabulary} {digit}: utterance {short[0] + 1} is too short to be a word")
        inputs = [word_input(a) for a in audios]
        vectors = self.model.embed_many(inputs)
        self.gallery.check_writable(f"enroll words of {vocabulary!r}")
        now = time.time()
        try:
            with self.gallery.transaction():
                self.db.executemany(
                    "INSERT INTO word_templates(vocabulary, digit, input, model_sha256, vector, source, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(vocabulary, digit, x.astype(np.float16).tobytes(), self.model.sha256,
                      v.astype(np.float32).tobytes(), source, now) for x, v in zip(inputs, vectors)])
        except sqlite3.Error as exc:
            raise storage_error(self.gallery.path, f"enroll words of {vocabulary!r}", exc) from None
        count = self._rows("SELECT COUNT(*) FROM word_templates WHERE vocabulary = ? AND digit = ?",
                           (vocabulary, digit))[0][0]
        return {"vocabulary": vocabulary, "digit": digit, "added": len(inputs), "templates": count}

    def remove(self, vocabulary: str, digit: int | None = None) -> int:
        """Drop a vocabulary's templates (of one digit, or all); returns how many."""
        self.gallery.check_writable(f"remove words of {vocabulary!r}")
        sql, args = "DELETE FROM word_templates WHERE vocabulary = ?", (vocabulary,)
        if digit is not None:
            sql, args = sql + " AND digit = ?", (vocabulary, check_digit(digit))
        try:
            with self.gallery.transaction():
                return self.db.execute(sql, args).rowcount
        except sqlite3.Error as exc:
            raise storage_error(self.gallery.path, f"remove words of {vocabulary!r}", exc) from None

    def listing(self) -> list[dict]:
        rows = self._rows("SELECT vocabulary, digit, COUNT(*) FROM word_templates GROUP BY vocabulary, digit "
                          "ORDER BY vocabulary, digit")
        out: dict[str, dict] = {}
        for vocabulary, digit, n in rows:
            out.setdefault(vocabulary, {"vocabulary": vocabulary, "digits": {}})["digits"][str(digit)] = n
        return list(out.values())

    def _reembed(self) -> None:
        """Templates embedded by another word model get this one's embedding, from their input."""
        stale = self._rows("SELECT id, input FROM word_templates WHERE model_sha256 != ?", (self.model.sha256,))
        if not stale:
            return
        inputs = [np.frombuffer(b, np.float16).astype(np.float32).reshape(1, FRAMES, FILTERS) for _, b in stale]
        vectors = self.model.embed_many(inputs)
        with self.gallery.transaction():
            self.db.executemany("UPDATE word_templates SET vector = ?, model_sha256 = ? WHERE id = ?",
                                [(v.astype(np.float32).tobytes(), self.model.sha256, i)
                                 for (i, _), v in zip(stale, vectors)])
        log.info("re-embedded %d word templates for word model %s", len(stale), self.model.sha256[:12])


def open_word_book(gallery: Gallery | None, cfg) -> WordBook | None:
    """The daemon's word book; None, with a warning, when the word model or the gallery is
    not usable (vocabularies are optional: everything else runs)."""
    try:
        model = load_word_model(cfg)
        return WordBook(gallery, model) if gallery is not None and model is not None else None
    except (ModelError, StorageError, GalleryError) as exc:
        log.warning("%s; vocabularies taught at run time are not available", exc)
        return None
