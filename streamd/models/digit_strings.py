"""Digit strings in one utterance ("4 7 1 9"): a segmenter in front of the digit classifier.

Within an utterance long enough to hold more than one digit, candidate boundaries are the
valleys of its level (10 ms frames, smoothed; a valley counts when it lies ``min_valley_db``
under the lower of the peaks around it). Every stretch between two candidate boundaries that
could be one digit is a candidate piece; the digit models name each piece as a clip of its
own (its audio between the utterance's own background, as the VAD cuts a clip: pre-roll,
speech, tail), and a small dynamic programme picks the segmentation whose pieces the models
name most confidently. A piece the models call "not a digit" (or are unsure of) makes the
whole string null, with a reason: never a wrong string.

Pure: the caller runs the models (``piece_audio`` gives each piece's audio) and hands back
their logits to ``decode``. Bounded: at most ``max_digits`` pieces, ``max_pieces`` scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamd.models.digits import DigitDecision, softmax

SAMPLE_RATE = 16000
FRAME = SAMPLE_RATE // 100  # 10 ms
NOT_A_DIGIT = 10  # the models' last class


@dataclass(frozen=True)
class StringParams:
    smooth_frames: int = 5  # moving average over the 10 ms levels
    active_range_db: float = 35.0  # frames within this of the loudest are the utterance's speech
    min_valley_db: float = 6.0  # a valley this far under the lower of its neighbouring peaks is a boundary
    peak_window_s: float = 0.3  # where those peaks are looked for, each side
    min_gap_s: float = 0.08  # two boundaries at least this far apart (the deeper one kept)
    min_piece_s: float = 0.12  # shortest stretch that may be one digit
    max_piece_s: float = 1.1  # longest
    min_string_s: float = 0.55  # speech shorter than this is one word: not segmented
    max_digits: int = 12
    max_pieces: int = 80  # candidate pieces scored at most (shallowest valleys dropped first)
    piece_bonus: float = 0.0  # log-score added per piece (more pieces vs fewer)
    # log-score a piece pays per 10 dB of each valley it spans: the models are sure of many a
    # piece that holds two digits, a deep valley inside a digit is rare
    valley_cost: float = 0.1
    valley_free_db: float = 30.0  # ... of its depth beyond this
    pre_s: float = 0.2  # background put before each piece (the VAD's pre-roll)
    tail_s: float = 0.15  # and after it (the VAD's tail)


@dataclass(frozen=True)
class Piece:
    start: int  # samples into the utterance's audio
    end: int


@dataclass(frozen=True)
class StringPlan:
    """Where an utterance may be cut and the pieces to score (indices into ``boundaries``)."""

    boundaries: tuple[int, ...]  # samples, first = speech start, last = speech end
    depths: tuple[float, ...]  # dB of each boundary's valley (0 for the ends)
    spans: tuple[tuple[int, int], ...]  # candidate pieces as (i, j) boundary indices
    background: np.ndarray  # the utterance's own audio before its speech, put around each piece

    @property
    def pieces(self) -> list[Piece]:
        return [Piece(self.boundaries[i], self.boundaries[j]) for i, j in self.spans]


@dataclass(frozen=True)
class DigitItem:
    digit: int
    t_start: float  # seconds into the utterance's audio
    t_end: float
    p: float


@dataclass(frozen=True)
class StringDecision:
    digits: str | None  # None: not a string of digits (``reason`` says why)
    items: tuple[DigitItem, ...]
    confidence: float
    reason: str | None = None
    spans: tuple[tuple[int, int], ...] = ()  # the chosen pieces (boundary indices)


def frame_levels(audio: np.ndarray, smooth: int) -> np.ndarray:
    """dB level of each 10 ms frame, smoothed by a moving average of ``smooth`` frames."""
    n = len(audio) // FRAME
    x = audio[: n * FRAME].astype(np.float64).reshape(n, FRAME)
    level = 10 * np.log10(np.mean(x * x, axis=1) + 1.0)
    if smooth > 1 and n >= smooth:
        level = np.convolve(level, np.ones(smooth) / smooth, mode="same")
    return level


def _valleys(level: np.ndarray, lo: int, hi: int, p: StringParams) -> list[tuple[int, float]]:
    """(frame, depth) of each valley strictly inside [lo, hi), deepest kept within ``min_gap_s``."""
    win = max(1, int(p.peak_window_s * 100))
    found = []
    for f in range(lo + 1, hi - 1):
        if level[f] > level[f - 1] or level[f] > level[f + 1]:
            continue
        left, right = level[max(lo, f - win) : f].max(), level[f + 1 : min(hi, f + 1 + win)].max()
        depth = min(left, right) - level[f]
        if depth >= p.min_valley_db:
            found.append((f, float(depth)))
    gap = max(1, int(p.min_gap_s * 100))
    kept: list[tuple[int, float]] = []
    for f, d in sorted(found, key=lambda v: -v[1]):
        if all(abs(f - g) >= gap for g, _ in kept):
            kept.append((f, d))
    return sorted(kept)


def _spans(bounds: list[int], p: StringParams) -> list[tuple[int, int]]:
    lo, hi = int(p.min_piece_s * SAMPLE_RATE), int(p.max_piece_s * SAMPLE_RATE)
    return [(i, j) for i in range(len(bounds)) for j in range(i + 1, len(bounds))
            if lo <= bounds[j] - bounds[i] <= hi]


def plan(audio: np.ndarray, p: StringParams = StringParams()) -> StringPlan | None:
    """Where the utterance's ``audio`` (int16, as the models see it) may be cut, or None when
    its speech is too short to hold more than one digit."""
    level = frame_levels(audio, p.smooth_frames)
    if not len(level):
        return None
    active = np.flatnonzero(level >= level.max() - p.active_range_db)
    lo, hi = int(active[0]), int(active[-1]) + 1
    if (hi - lo) / 100 < p.min_string_s:
        return None
    valleys = _valleys(level, lo, hi, p)
    while True:
        bounds = [lo * FRAME] + [(f * FRAME + FRAME // 2) for f, _ in valleys] + [hi * FRAME]
        spans = _spans(bounds, p)
        if len(spans) <= p.max_pieces or not valleys:
            break
        valleys.remove(min(valleys, key=lambda v: v[1]))  # the shallowest valley is no boundary
    background = audio[max(0, lo * FRAME - int(p.pre_s * SAMPLE_RATE)) : lo * FRAME]
    depths = (0.0, *(d for _, d in valleys), 0.0)
    return StringPlan(tuple(bounds), depths, tuple(spans), background)


def piece_audio(audio: np.ndarray, piece: Piece, plan_: StringPlan, p: StringParams = StringParams()) -> np.ndarray:
    """A piece as a clip of its own: the utterance's background, the piece, background."""
    pre, tail = _pad(plan_.background, int(p.pre_s * SAMPLE_RATE)), _pad(plan_.background, int(p.tail_s * SAMPLE_RATE))
    return np.concatenate((pre, audio[piece.start : piece.end], tail[::-1])).astype(np.int16)


def _pad(background: np.ndarray, n: int) -> np.ndarray:
    """``n`` samples of background (repeated, or silence when there is none)."""
    if not len(background):
        return np.zeros(n, np.int16)
    reps = -(-n // len(background))
    return np.tile(background, reps)[-n:]


def decode(plan_: StringPlan, logits: list[np.ndarray], min_confidence: float,
           p: StringParams = StringParams()) -> StringDecision:
    """The segmentation whose pieces are named most confidently (each piece scored by the log
    of its best class, "not a digit" included), then the string it names, or null."""
    probs = [softmax(z) for z in logits]
    inside = np.cumsum((0.0, *(max(0.0, d - p.valley_free_db) for d in plan_.depths)))  # inside[j] - inside[i + 1]: depths strictly between i and j
    score = {(i, j): float(np.log(max(pr.max(), 1e-12))) + p.piece_bonus
             - p.valley_cost * (inside[j] - inside[i + 1]) / 10 for (i, j), pr in zip(plan_.spans, probs)}
    n = len(plan_.boundaries)
    # best[k][j]: (score, previous boundary) of covering boundaries 0..j with k pieces
    best = [[(-np.inf, -1)] * n for _ in range(p.max_digits + 1)]
    best[0][0] = (0.0, -1)
    ending: dict[int, list[tuple[int, float]]] = {}
    for (i, j), s in score.items():
        ending.setdefault(j, []).append((i, s))
    for k in range(1, p.max_digits + 1):
        for j, starts in ending.items():
            cands = [(best[k - 1][i][0] + s, i) for i, s in starts if best[k - 1][i][0] > -np.inf]
            if cands:
                best[k][j] = max(cands)
    k = max(range(1, p.max_digits + 1), key=lambda k: best[k][n - 1][0])
    if best[k][n - 1][0] == -np.inf:
        return StringDecision(None, (), 0.0, "no_segmentation")
    cut, j = [], n - 1
    for kk in range(k, 0, -1):
        i = best[kk][j][1]
        cut.append((i, j))
        j = i
    chosen = list(reversed(cut))
    return name(plan_, chosen, [logits[plan_.spans.index(span)] for span in chosen], min_confidence)


def name(plan_: StringPlan, chosen: list[tuple[int, int]], logits: list[np.ndarray],
         min_confidence: float) -> StringDecision:
    """The string the ``chosen`` pieces name, from their ``logits``; null when one is not a
    digit or named below ``min_confidence``."""
    items, reason = [], None
    for (i, j), pr in zip(chosen, map(softmax, logits)):
        best = int(np.argmax(pr))
        digit_best = int(np.argmax(pr[:10]))
        a, b = plan_.boundaries[i] / SAMPLE_RATE, plan_.boundaries[j] / SAMPLE_RATE
        items.append(DigitItem(digit_best, a, b, float(pr[digit_best])))
        if best == NOT_A_DIGIT and reason is None:
            reason = "not_a_digit"
        elif pr[best] < min_confidence and reason is None:
            reason = "unsure"
    confidence = float(np.prod([it.p for it in items]))
    if reason is not None:
        return StringDecision(None, tuple(items), confidence, reason, tuple(chosen))
    return StringDecision("".join(str(it.digit) for it in items), tuple(items), confidence, None, tuple(chosen))


def single(decision: DigitDecision, t_start: float, t_end: float) -> StringDecision:
    """A one-word utterance: the digit decision as a string of one (or null)."""
    if decision.digit is None:
        return StringDecision(None, (), decision.confidence, "not_a_digit")
    return StringDecision(str(decision.digit), (DigitItem(decision.digit, t_start, t_end, decision.confidence),),
                          decision.confidence)
