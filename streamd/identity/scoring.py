"""Open-set speaker decisions: enrolled centroids, adaptive s-norm against an impostor cohort,
and a threshold set from a target false-accept rate.

Pure logic on arrays; storage is streamd.identity.gallery.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from streamd.signal.vad import SILENT_DBFS

UNKNOWN = "unknown"  # the speaker of an utterance nobody enrolled matches

__all__ = ["Utterance", "UNKNOWN", "Decision", "Scorer", "Calibration", "QualityFusion", "Enrolled", "decide", "l2_normalize",
           "quality_measures", "QUALITY_MEASURES"]


@dataclass(frozen=True)
class Utterance:
    """One utterance's normalised speaker features, as stored for enrollment, and the
    level of its audio (checked by the enrollment quality gates, not stored)."""

    features: np.ndarray  # (frames, dims) float32
    seconds: float
    peak: float = 0.0  # largest |sample| / 32768
    clipped: float = 0.0  # share of samples at full scale
    rms_dbfs: float = SILENT_DBFS


def l2_normalize(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Decision:
    speaker: str
    score: float  # normalised score of the best candidate (what the threshold applies to)
    candidates: list[dict]
    raw: float = 0.0  # its cosine
    cluster: str | None = None  # for an unknown voice heard before: its cluster label


class Scorer:
    """Adaptive s-norm (AS-norm): a cosine score is standardised against the top-k scores
    each side (the utterance, the enrolled speaker) gets from an impostor cohort, so one
    threshold means the same false-accept rate for every speaker. Without a cohort the
    score is the cosine itself.

    With a ``fusion``, ``score`` fuses the AS-norm score with the trial's quality measures.

    The statistics of the last ``memo`` vectors are kept: the final decision on an unknown
    voice asks for its utterance's twice (enrolled speakers, then clusters of unknown voices)."""

    def __init__(self, cohort: np.ndarray | None, top_k: int = 100, memo: int = 512,
                 fusion: QualityFusion | None = None):
        self.cohort = None if cohort is None or len(cohort) == 0 else l2_normalize(cohort)
        self.top_k = top_k
        self.fusion = fusion if self.cohort is not None else None
        self.memo = memo
        self._known: OrderedDict[bytes, np.ndarray] = OrderedDict()

    @property
    def normalised(self) -> bool:
        return self.cohort is not None

    def stats(self, vectors: np.ndarray) -> np.ndarray:
        """(n, 2): mean and std of each vector's top-k cohort scores."""
        vectors = l2_normalize(np.atleast_2d(vectors))
        if self.cohort is None:
            return np.tile([0.0, 1.0], (len(vectors), 1))
        keys = [row.tobytes() for row in vectors]
        todo = [i for i, key in enumerate(keys) if key not in self._known]
        if todo:
            for i, row in zip(todo, self._top_stats(vectors[todo])):
                self._known[keys[i]] = row
        for key in keys:
            self._known.move_to_end(key)
        out = np.stack([self._known[key] for key in keys])
        while len(self._known) > max(self.memo, len(keys)):
            self._known.popitem(last=False)
        return out

    def _top_stats(self, unit: np.ndarray) -> np.ndarray:
        scores = unit @ self.cohort.T
        k = min(self.top_k, scores.shape[1])
        top = np.partition(scores, scores.shape[1] - k, axis=1)[:, -k:]  # the k best, unordered
        return np.stack([top.mean(axis=1), np.maximum(top.std(axis=1), 1e-4)], axis=1)

    def normalise(self, raw: np.ndarray, probe: np.ndarray, enrolled: np.ndarray) -> np.ndarray:
        """raw (n,), probe stats (2,), enrolled stats (n, 2) -> normalised scores (n,)."""
        if self.cohort is None:
            return raw
        return as_norm(raw, probe, enrolled)

    def score(self, raw: np.ndarray, probe: np.ndarray, enrolled: np.ndarray, windows: int = 1) -> np.ndarray:
        """The score a decision thresholds: the AS-norm score, or with a ``fusion`` that score
        fused with the trial's quality measures (``windows``: how many model windows the
        utterance filled)."""
        if self.fusion is None:
            return self.normalise(raw, probe, enrolled)
        return self.from_measures(quality_measures(raw, probe, enrolled, windows))

    def from_measures(self, measures: np.ndarray) -> np.ndarray:
        """The same score from trials' quality measures (..., len(QUALITY_MEASURES)): the
        fusion's, else the AS-norm score (the first measure)."""
        return self.fusion.score(measures) if self.fusion is not None else np.asarray(measures)[..., 0]


# What a trial's score is fused from: its AS-norm score, its cosine, the mean and spread of
# the top-k cohort scores of each side, and the utterance's length in model windows.
QUALITY_MEASURES = ("as_norm", "cosine", "probe_cohort_mean", "probe_cohort_std",
                    "enrolled_cohort_mean", "enrolled_cohort_std", "log_windows")
LOG_WINDOWS = QUALITY_MEASURES.index("log_windows")


def as_norm(raw: np.ndarray, probe: np.ndarray, enrolled: np.ndarray) -> np.ndarray:
    """Cosines standardised by each side's cohort statistics (mean, std), averaged."""
    return 0.5 * ((raw - enrolled[:, 0]) / enrolled[:, 1] + (raw - probe[..., 0]) / probe[..., 1])


def quality_measures(raw: np.ndarray, probe: np.ndarray, enrolled: np.ndarray, windows=1) -> np.ndarray:
    """(n, len(QUALITY_MEASURES)) for ``raw`` cosines (n,) of one utterance (probe stats (2,),
    or (n, 2) for n utterances) against speakers with ``enrolled`` stats (n, 2)."""
    raw = np.asarray(raw, np.float64)
    probe = np.broadcast_to(np.asarray(probe, np.float64), (len(raw), 2))
    enrolled = np.asarray(enrolled, np.float64)
    log_windows = np.broadcast_to(np.log(np.maximum(np.asarray(windows, np.float64), 1.0)), raw.shape)
    return np.stack([as_norm(raw, probe, enrolled), raw, probe[:, 0], probe[:, 1], enrolled[:, 0], enrolled[:, 1],
                     log_windows], axis=1)


@dataclass(frozen=True)
class QualityFusion:
    """A linear fusion of a trial's AS-norm score with its quality measures (a logistic
    regression fitted on training speakers' trials, streamd.train.speaker_quality). AS-norm
    alone treats a close-sounding stranger's long utterance like any other; the cohort
    statistics and the length tell the fusion how far a score can be trusted."""

    weights: tuple[float, ...]
    bias: float
    max_windows: float = float("inf")  # the longest utterance (in windows) it was fitted on

    @classmethod
    def from_card(cls, spec: dict) -> QualityFusion:
        if tuple(spec.get("measures", ())) != QUALITY_MEASURES:
            raise ValueError(f"quality fusion over {spec.get('measures')!r}, this streamd fuses {list(QUALITY_MEASURES)}")
        weights = tuple(float(w) for w in spec["weights"])
        if len(weights) != len(QUALITY_MEASURES):
            raise ValueError(f"quality fusion has {len(weights)} weights for {len(QUALITY_MEASURES)} measures")
        return cls(weights, float(spec["bias"]), float(spec.get("max_windows", float("inf"))))

    def score(self, measures: np.ndarray) -> np.ndarray:
        # The length weight was fitted on utterances of up to max_windows windows: a longer one
        # is scored as that long, not by extrapolating the line (which would turn against it).
        m = np.array(measures, np.float64)
        m[..., LOG_WINDOWS] = np.minimum(m[..., LOG_WINDOWS], np.log(self.max_windows))
        return m @ np.asarray(self.weights) + self.bias


@dataclass(frozen=True)
class Calibration:
    """Normalised-score threshold per false-accept rate, measured on training speakers'
    phrases. With ``short`` (thresholds at the same rates from single-word trials) an
    utterance's threshold follows its length: the single words' at ``short_seconds`` or less,
    the phrases' at ``long_seconds`` or more, on the line between them in between. A stranger's
    single word scores lower than a stranger's phrase, so one phrase threshold for both would
    leave most of an enrolled speaker's single words unnamed."""

    far: tuple[float, ...]
    threshold: tuple[float, ...]
    short: tuple[float, ...] = ()
    short_seconds: float = 0.0
    long_seconds: float = 0.0

    @classmethod
    def from_card(cls, spec: dict) -> Calibration:
        """The table as a speaker model card's ``calibration`` holds it."""
        short = spec.get("single_word", {})
        return cls(tuple(spec["far"]), tuple(spec["threshold"]), tuple(short.get("threshold", ())),
                   float(short.get("seconds", 0.0)), float(spec.get("phrase_seconds", 0.0)))

    def threshold_for(self, far: float, seconds=None):
        """The threshold for ``far``; for utterances of ``seconds`` (a number or an array)
        when given, else the phrases' (the stricter, for an utterance of unknown length)."""
        long = self._at(far, self.threshold)
        if seconds is None or not self.short:
            return long
        short = self._at(far, self.short)
        span = max(self.long_seconds - self.short_seconds, 1e-6)
        weight = np.clip((np.asarray(seconds, np.float64) - self.short_seconds) / span, 0.0, 1.0)
        out = short + weight * (long - short)
        return float(out) if np.ndim(out) == 0 else out

    def _at(self, far: float, thresholds: tuple[float, ...]) -> float:
        # far decreases as the threshold rises; interpolate in log(far).
        fars = np.log(np.maximum(np.asarray(self.far), 1e-9))
        order = np.argsort(fars)
        return float(np.interp(np.log(max(far, 1e-9)), fars[order], np.asarray(thresholds)[order]))


@dataclass
class Enrolled:
    names: list[str] = field(default_factory=list)
    centroids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    stats: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    @classmethod
    def build(cls, by_name: dict[str, np.ndarray], scorer: Scorer) -> Enrolled:
        if not by_name:
            return cls()
        names = sorted(by_name)
        cents = l2_normalize(np.stack([l2_normalize(by_name[n]).mean(axis=0) for n in names]))
        return cls(names, cents, scorer.stats(cents))


def decide(embedding: np.ndarray, enrolled: Enrolled, scorer: Scorer, threshold: float, top: int = 3,
           windows: int = 1) -> Decision:
    if not enrolled.names:
        return Decision(UNKNOWN, 0.0, [])
    e = l2_normalize(embedding)
    raw = enrolled.centroids @ e
    scores = scorer.score(raw, scorer.stats(e)[0], enrolled.stats, windows)
    order = np.argsort(-scores)[:top]
    candidates = [{"name": enrolled.names[i], "score": float(scores[i])} for i in order]
    best = int(order[0])
    speaker = enrolled.names[best] if scores[best] >= threshold else UNKNOWN
    return Decision(speaker, float(scores[best]), candidates, raw=float(raw[best]))
