"""Vocabularies taught at run time: the word model's session and the templates' storage.

Templates live in the gallery (streamd.identity.word_store: the SQLite file's table
``word_templates``, or the shared PostgreSQL gallery's): the vocabulary, the digit, the word
model's input (so a new word model re-embeds them) and its embedding. Any connection's change is seen by the daemon before its next decision, so
``streamd digits enroll`` works on a running daemon without a restart.
"""

from __future__ import annotations

import logging
import re
import time

import numpy as np

from streamd.identity.gallery import Gallery, GalleryError, StorageError
from streamd.models.cards import ModelCard, ModelError, load_card, verified
from streamd.models.providers import session_options
from streamd.signal.features import FILTERS, FRAMES, word_input
from streamd.models.words import BUILTIN, MatchRule, TemplateIndex, WordMatch

log = logging.getLogger(__name__)

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
    """Templates, their index and the match, over a gallery's word store."""

    def __init__(self, gallery: Gallery, model: WordModel):
        self.gallery = gallery
        self.store = gallery.word_store()
        self.model = model
        self.rule = match_rule(model)
        self._version: int | None = None
        self._index = TemplateIndex([])
        if not gallery.readonly:
            self.store.prepare()
            try:
                self._reembed()
            except StorageError as exc:
                if not gallery.down:
                    raise
                log.warning("%s; word templates are re-embedded when the gallery returns", exc)

    def _changed(self) -> bool:
        n = self.store.version()
        changed, self._version = n != self._version, n
        return changed

    def index(self) -> TemplateIndex:
        if self._changed():
            rows = self.store.vectors(self.model.sha256)
            self._index = TemplateIndex([(v, d, np.frombuffer(b, np.float32)) for v, d, b in rows])
        return self._index

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
        self.store.add(vocabulary, [(vocabulary, digit, x.astype(np.float16).tobytes(), self.model.sha256,
                                     v.astype(np.float32).tobytes(), source, now) for x, v in zip(inputs, vectors)])
        return {"vocabulary": vocabulary, "digit": digit, "added": len(inputs),
                "templates": self.store.count(vocabulary, digit)}

    def remove(self, vocabulary: str, digit: int | None = None) -> int:
        """Drop a vocabulary's templates (of one digit, or all); returns how many."""
        self.gallery.check_writable(f"remove words of {vocabulary!r}")
        return self.store.remove(vocabulary, None if digit is None else check_digit(digit))

    def listing(self) -> list[dict]:
        out: dict[str, dict] = {}
        for vocabulary, digit, n in self.store.counts():
            out.setdefault(vocabulary, {"vocabulary": vocabulary, "digits": {}})["digits"][str(digit)] = n
        return list(out.values())

    def catch_up(self) -> None:
        """A shared gallery came back: templates made by another word model are re-embedded."""
        self._reembed()

    def _reembed(self) -> None:
        """Templates embedded by another word model get this one's embedding, from their input."""
        stale = self.store.stale(self.model.sha256)
        if not stale:
            return
        inputs = [np.frombuffer(b, np.float16).astype(np.float32).reshape(1, FRAMES, FILTERS) for _, b in stale]
        vectors = self.model.embed_many(inputs)
        self.store.replace_vectors(self.model.sha256, [(i, v.astype(np.float32).tobytes())
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
