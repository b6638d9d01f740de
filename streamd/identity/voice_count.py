"""Was one voice heard, or two? The enrollment gate against two people enrolled as one.

Each enrollment utterance is cut into the speaker model's windows and each window embedded,
in the order spoken. At every point where the voice could change, the windows before and
after are averaged into two voices and scored as identification scores a trial (AS-norm
fused with the trial's quality measures). One person scores high at every point; two people
(one after the other, in one file or in several) score like two speakers where they change.
The refusal threshold is fitted on the speaker model's training speakers, simulated one- and
two-person enrollments (``streamd train enroll-gate``), and kept in the model card.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamd.identity.scoring import Scorer, l2_normalize
from streamd.models.inference import OnnxModel


@dataclass(frozen=True)
class VoiceSplit:
    score: float  # the lowest score between the windows before and after a point
    windows: tuple[int, int]  # how many windows each side holds


@dataclass(frozen=True)
class TwoVoiceGate:
    """Refuse an enrollment whose two sides score below ``threshold``."""

    threshold: float
    one_person_refused: float  # on the fitting trials, the share of one-person enrollments refused
    two_people_accepted: float  # ... and of two-person enrollments accepted

    @classmethod
    def from_card(cls, spec: dict) -> TwoVoiceGate:
        return cls(float(spec["threshold"]), float(spec["one_person_refused"]), float(spec["two_people_accepted"]))


def window_embeddings(model: OnnxModel, utterances: list[np.ndarray]) -> np.ndarray:
    """(windows, dim): each model window of each utterance's normalised features, embedded,
    in the order spoken."""
    rows = [model.infer(model.inputs(f)) for f in utterances if len(f)]
    return l2_normalize(np.concatenate(rows)) if rows else np.zeros((0, 0), np.float32)


def side_score(windows: np.ndarray, cut: int, scorer: Scorer) -> float:
    """The score identification would give the windows before ``cut`` and those after it as
    one speaker (the shorter side as the utterance, the longer as the enrolled voice)."""
    sides = sorted((windows[:cut], windows[cut:]), key=len)
    voices = l2_normalize(np.stack([side.mean(axis=0) for side in sides]))
    stats = scorer.stats(voices)
    return float(scorer.score(np.array([voices[0] @ voices[1]]), stats[0], stats[1:2], windows=len(sides[0]))[0])


def split_score(windows: np.ndarray, scorer: Scorer) -> VoiceSplit | None:
    """The lowest score over the points where the voice could change (each side at least two
    windows when there are four), or None with a single window."""
    n = len(windows)
    if n < 2:
        return None
    least = 2 if n >= 4 else 1
    score, cut = min((side_score(windows, c, scorer), c) for c in range(least, n - least + 1))
    return VoiceSplit(score, (cut, n - cut))
