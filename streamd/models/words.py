"""Words taught at run time: a pretrained word embedding, templates and the match.

A user teaches streamd the digits of a language (or an accent) by saying each a few times:
each utterance becomes a *template*, the word model's embedding of it, stored with its
vocabulary and digit. A later utterance is named by its nearest templates when it is close
enough to one digit's and clearly closer to it than to any other's; otherwise the built-in
digit models decide. Nothing is trained: enrollment is data.

Pure processing: the match (the model's input from audio is streamd.signal.features.word_input). Storage and the model's
session are in ``streamd.identity.vocabulary``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BUILTIN = "builtin"  # the vocabulary of the digit models' own decisions
TOP_K = 3  # a digit's score: the mean cosine of its nearest templates (fewer if it has fewer)


@dataclass(frozen=True)
class WordMatch:
    """The templates' answer for one utterance."""

    vocabulary: str
    digit: int
    score: float  # mean cosine of the digit's nearest templates
    margin: float  # over the best other digit (of any vocabulary); 1.0 when there is none
    candidates: list[dict] = field(default_factory=list)  # the best few (vocabulary, digit, score)


@dataclass(frozen=True)
class MatchRule:
    """When the templates name a word: its score at least ``min_score`` and ``min_margin``
    above the best other digit's. Fitted by ``streamd train words`` (its card)."""

    min_score: float = 0.75
    min_margin: float = 0.05


class TemplateIndex:
    """Every enrolled template, grouped by (vocabulary, digit)."""

    def __init__(self, templates: list[tuple[str, int, np.ndarray]]):
        keys = sorted({(v, d) for v, d, _ in templates})
        self.keys = keys
        self._vectors = [np.stack([vec for v, d, vec in templates if (v, d) == k]).astype(np.float32) for k in keys]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def vocabularies(self) -> list[str]:
        return sorted({v for v, _ in self.keys})

    def scores(self, vector: np.ndarray) -> np.ndarray:
        """Per (vocabulary, digit): the mean cosine of its TOP_K nearest templates."""
        return self.score_matrix(vector[None])[0]

    def score_matrix(self, vectors: np.ndarray) -> np.ndarray:
        """``scores`` of many vectors at once: (vectors, keys)."""
        out = np.empty((len(vectors), len(self.keys)), np.float32)
        for k, templates in enumerate(self._vectors):
            cos = -np.sort(-(vectors @ templates.T), axis=1)
            out[:, k] = cos[:, :TOP_K].mean(axis=1)
        return out

    def match(self, vector: np.ndarray, rule: MatchRule) -> WordMatch | None:
        """The named word, or None when no digit's templates are near and clear enough."""
        if not self.keys:
            return None
        scores = self.scores(vector)
        best, margin, named = choose(scores[None], self.keys, rule)
        order = np.argsort(-scores)[:3]
        candidates = [{"vocabulary": self.keys[i][0], "digit": self.keys[i][1], "score": round(float(scores[i]), 4)}
                      for i in order]
        if not named[0]:
            return None
        vocabulary, digit = self.keys[best[0]]
        return WordMatch(vocabulary, digit, float(scores[best[0]]), float(margin[0]), candidates)


def choose(scores: np.ndarray, keys: list[tuple[str, int]], rule: MatchRule) -> tuple[np.ndarray, ...]:
    """For each row of a (utterances, keys) score matrix: the best key, its margin over the best
    key of another digit (another vocabulary's same digit is no rival: two languages may share
    a word; 1.0 when there is none), and whether the rule names it."""
    digits = np.array([d for _, d in keys])
    best = np.argmax(scores, axis=1)
    top = scores[np.arange(len(scores)), best]
    rivals = np.where(digits[None, :] != digits[best][:, None], scores, -np.inf).max(axis=1)
    margin = np.where(np.isfinite(rivals), top - rivals, 1.0)
    return best, margin, (top >= rule.min_score) & (margin >= rule.min_margin)
