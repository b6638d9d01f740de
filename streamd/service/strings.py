"""A stream's digit strings: the candidate pieces of a final utterance scored with its final
decision (the cascade's cheap stage), the chosen pieces named by the full digit models in a
second job, and the ``digits`` event (streamd.models.digit_strings does the thinking)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import numpy as np

from streamd.models import digit_strings as ds
from streamd.models.digits import DigitDecision
from streamd.models.inference import FeaturesByFrontEnd
from streamd.service.events import DigitsEvent
from streamd.service.pending import PendingWork
from streamd.signal.features import FeatureParams, features_of_audio
from streamd.signal.vad import SpeechEnd


@dataclass(frozen=True)
class StringTask:
    """An utterance's candidate pieces (none: too short to hold more than one digit)."""

    plan: ds.StringPlan | None
    pieces: tuple[FeaturesByFrontEnd, ...]  # each piece's features, computed on the models' thread


def piece_features(audio: np.ndarray, front_ends: tuple[FeatureParams, ...]) -> FeaturesByFrontEnd:
    """A piece's features per front end, computed when a model that reads them runs."""
    return {p: partial(features_of_audio, audio, p) for p in front_ends}


class DigitStrings:
    def __init__(self, stream: str, pending: PendingWork, front_ends: tuple[FeatureParams, ...],
                 params: ds.StringParams = ds.StringParams(), min_s: float = 0.0):
        self.stream = stream
        self.pending = pending
        self.front_ends = front_ends
        self.params = params
        # Outside challenges (digits.strings_min_s; 0: never): the search costs several words' worth.
        self.unchallenged = replace(params, min_string_s=max(params.min_string_s, min_s)) if min_s > 0 else None

    def task(self, audio: np.ndarray, challenged: bool = True) -> StringTask:
        """Where the utterance's ``audio`` (as the models see it) may be cut: cheap (its 10 ms
        levels). Unless it answers a challenge, only long utterances are (``min_s``)."""
        params = self.params if challenged else self.unchallenged
        if params is None:
            return StringTask(None, ())
        plan = ds.plan(audio, params)
        if plan is None:
            return StringTask(None, ())
        return StringTask(plan, tuple(piece_features(ds.piece_audio(audio, piece, plan, self.params), self.front_ends)
                                      for piece in plan.pieces))

    def decide(self, end: SpeechEnd, task: StringTask, audio: np.ndarray, digit: DigitDecision,
               cheap: list | None, min_confidence: float, done: Callable[[ds.StringDecision], None]) -> None:
        """The utterance's string, given to ``done`` now (one word) or once its chosen pieces are named."""
        if task.plan is None or not cheap:
            done(ds.single(digit, end.t_start - end.audio_t, end.t_end - end.audio_t))
            return
        chosen = ds.decode(task.plan, cheap, min_confidence, self.params)
        if not chosen.spans:
            done(chosen)
            return
        index = {span: k for k, span in enumerate(task.plan.spans)}
        feats = tuple(task.pieces[index[span]] for span in chosen.spans)
        name = partial(self._named, end, task.plan, chosen.spans, min_confidence, done)
        self.pending.name_pieces(end.utterance, feats, name)

    @staticmethod
    def _named(end: SpeechEnd, plan: ds.StringPlan, spans, min_confidence: float,
               done: Callable[[ds.StringDecision], None], logits: list) -> None:
        done(ds.name(plan, list(spans), logits, min_confidence))


def digits_event(stream: str, end: SpeechEnd, decision: ds.StringDecision, speaker: str) -> DigitsEvent:
    """The ``digits`` event; its items' times in stream time (the decision's are seconds into
    the utterance's audio)."""
    offset = end.audio_t
    items = [{"digit": it.digit, "t_start": offset + it.t_start, "t_end": offset + it.t_end, "p": it.p}
             for it in decision.items]
    return DigitsEvent(stream, end.utterance, end.t_start, end.t_end, digits=decision.digits,
                       items=items if decision.digits is not None else [], confidence=decision.confidence,
                       speaker=speaker, reason=decision.reason, latency_s=time.monotonic() - end.closed_at)
